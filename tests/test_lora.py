"""LoRA files (sdmagic/lora.py): kohya/A1111 and diffusers/PEFT files made here with known random
factors give the weights a hand merge gives, and the weights PyTorch diffusers' `load_lora_weights` +
`fuse_lora` give (where torch and peft are installed); unmatched keys are one warning, a file of which
nothing matches is an error, hostile files are one-line errors, and re-merging from the kept base
values equals merging once. SDXL: `lora_te1_`/`lora_te2_` and the original UNet's (SGM) block names.
"""

import hashlib
import json
import os
import struct
import types
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from sdmagic import lora, tiny
from sdmagic.convert import flax_to_pytorch
from sdmagic.errors import ModelLoadError, SDMagicError
from sdmagic.models import load_model

RANK = 4
# PyTorch module names in `tiny` (SD 1.x's shape): attention and feed-forward (what every LoRA
# trains), a 1x1-conv proj_in, and LoCon's conv layers (3x3 down, 1x1 up).
UNET_LINEAR = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2",
    "up_blocks.0.attentions.1.proj_in",
]
UNET_CONV = [
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.1.resnets.0.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.resnets.2.conv2",
]
TEXT = [
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.1.self_attn.out_proj",
    "text_model.encoder.layers.1.mlp.fc1",
]
# The same UNet layers under the original (SGM) UNet's names, as kohya names SDXL's: tiny has
# input_blocks 1, 2 (level 0), 3 (its downsampler), 4, 5 (level 1); output_blocks 0-2 (level 0 of
# the up path, upsampler in 2) and 3-5.
SGM = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0": "input_blocks.5.1.transformer_blocks.0.attn1.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "middle_block.1.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.2.1.transformer_blocks.0.ff.net.2",
    "up_blocks.0.attentions.1.proj_in": "output_blocks.1.1.proj_in",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.1.resnets.0.time_emb_proj": "input_blocks.4.0.emb_layers.1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.resnets.2.conv2": "output_blocks.5.0.out_layers.3",
}
TOLERANCE = 1e-6


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_model(str(tiny_dir))


def torch_state(params, component):
    return flax_to_pytorch(params[component], diffusers_names=component == "unet")


def make_factors(state, names, seed, conv=False):
    """{module: (down, up)} of rank RANK for the PyTorch weights `state` has under `names`; conv
    layers get 4-D factors as kohya and PEFT store them (a 3x3 down and a 1x1 up)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        shape = state[name + ".weight"].shape
        if len(shape) == 4:
            down = rng.standard_normal((RANK, shape[1], shape[2], shape[3]))
            up = rng.standard_normal((shape[0], RANK, 1, 1))
        else:
            down, up = rng.standard_normal((RANK, shape[1])), rng.standard_normal((shape[0], RANK))
        out[name] = ((down * 0.2).astype(np.float32), (up * 0.2).astype(np.float32))
    return out


def kohya_key(prefix, name):
    return prefix + name.replace(".", "_")


def write_kohya(path, entries, metadata=None):
    """entries: [(kohya module name, down, up, alpha or None)] -> a kohya/A1111 .safetensors."""
    tensors = {}
    for module, down, up, alpha in entries:
        tensors[f"{module}.lora_down.weight"] = down
        tensors[f"{module}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{module}.alpha"] = np.array(alpha, np.float32)
    save_file(tensors, str(path), metadata=metadata)
    return path


def hand_merge(state, modules, weight):
    """PyTorch-layout weights plus weight * scale * up @ down for each (name, down, up, scale),
    written without sdmagic's code: the reference for the merge."""
    state = {k: v.astype(np.float32).copy() for k, v in state.items()}
    for name, down, up, scale in modules:
        w = state[name + ".weight"]
        product = up.reshape(up.shape[0], RANK).astype(np.float64) @ down.reshape(RANK, -1).astype(np.float64)
        state[name + ".weight"] = (w + weight * scale * product.reshape(w.shape)).astype(np.float32)
    return state


def merged(params, matched, weight):
    """params with the LoRA merged, as a session does it: base values of the touched leaves kept."""
    base = lora.take_leaves(params, lora.touched_paths([matched]))
    return lora.with_leaves(params, lora.merge(base, [(matched, weight)]))


def max_difference(ours, reference):
    assert set(reference) <= set(ours), sorted(set(reference) - set(ours))[:3]
    return max(float(np.max(np.abs(ours[k].astype(np.float32) - reference[k].astype(np.float32)))) for k in reference)


def match_quietly(lora_file, params, model=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.LoraWarning)
        return lora.match_lora(lora_file, params, model)


def kohya_entries(unet_state, text_state, seed=0, alphas=(8.0, 2.0, None)):
    """A kohya file's entries for UNET_LINEAR + UNET_CONV + TEXT, and the hand-merge modules per
    component. Alphas cycle through `alphas` (None: no alpha key, scale 1)."""
    factors = {"unet": make_factors(unet_state, UNET_LINEAR + UNET_CONV, seed),
               "text_encoder": make_factors(text_state, TEXT, seed + 1)}
    entries, modules = [], {"unet": [], "text_encoder": []}
    i = 0
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for name, (down, up) in factors[component].items():
            alpha = alphas[i % len(alphas)]
            i += 1
            entries.append((kohya_key(prefix, name), down, up, alpha))
            modules[component].append((name, down, up, 1.0 if alpha is None else alpha / RANK))
    return entries, modules


# ---------------------------------------------------------------------------------------------- hand merges


def test_kohya_file_merges_as_by_hand(tiny_model, tmp_path):
    params = tiny_model.params
    unet_state, text_state = torch_state(params, "unet"), torch_state(params, "text_encoder")
    entries, modules = kohya_entries(unet_state, text_state)
    loaded = lora.read_lora(write_kohya(tmp_path / "style_v2.safetensors", entries))
    assert loaded.name == "style_v2" and loaded.format == "kohya" and len(loaded.modules) == len(entries)
    matched = match_quietly(loaded, params, tiny_model.model)
    assert len(matched.paths) == len(entries)
    out = merged(params, matched, 0.7)
    for component, state in (("unet", unet_state), ("text_encoder", text_state)):
        assert max_difference(torch_state(out, component), hand_merge(state, modules[component], 0.7)) < TOLERANCE
    # Nothing else changed, and the input tree is untouched.
    assert out["vae"] is params["vae"]
    assert max_difference(torch_state(params, "unet"), unet_state) == 0


def test_sgm_names_merge_like_diffusers_names(tiny_model, tmp_path):
    """The original UNet's block names (how kohya names SDXL's layers) reach the same layers."""
    params = tiny_model.params
    unet_state = torch_state(params, "unet")
    factors = make_factors(unet_state, UNET_LINEAR + UNET_CONV, 3)
    assert set(factors) == set(SGM)
    plain = [(kohya_key("lora_unet_", n), d, u, 2.0) for n, (d, u) in factors.items()]
    sgm = [(kohya_key("lora_unet_", SGM[n]), d, u, 2.0) for n, (d, u) in factors.items()]
    a = match_quietly(lora.read_lora(write_kohya(tmp_path / "plain.safetensors", plain)), params)
    b = match_quietly(lora.read_lora(write_kohya(tmp_path / "sgm.safetensors", sgm)), params)
    assert a.paths == b.paths and len(a.paths) == len(SGM)
    reference = hand_merge(unet_state, [(n, d, u, 0.5) for n, (d, u) in factors.items()], 1.3)
    assert max_difference(torch_state(merged(params, b, 1.3), "unet"), reference) < TOLERANCE


def test_sgm_names_as_diffusers_converts_them(tiny_model):
    """Our SGM -> diffusers block numbering is the one diffusers' own converter uses."""
    torch = pytest.importorskip("torch")
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    state = {}
    for original in SGM.values():
        key = kohya_key("lora_unet_", original)
        state[f"{key}.lora_down.weight"] = torch.zeros(RANK, 1)
        state[f"{key}.lora_up.weight"] = torch.zeros(1, RANK)
    mapped = conversion._maybe_map_sgm_blocks_to_diffusers(dict(state), types.SimpleNamespace(layers_per_block=2))
    converted, _ = conversion._convert_non_diffusers_lora_to_diffusers(mapped)
    names = set()
    for key in converted:
        if ".down." in key or "_lora.down" in key:
            name = key.removeprefix("unet.").replace(".processor.", ".")
            for old, new in ((".to_q_lora.down.weight", ".to_q"), (".to_k_lora.down.weight", ".to_k"),
                             (".to_out_lora.down.weight", ".to_out.0"), (".lora.down.weight", "")):
                name = name.replace(old, new)
            names.add(name)
    assert names == set(SGM)


def peft_metadata(names, alpha, patterns):
    """A PEFT LoraConfig as diffusers' save_lora_weights stores it per component."""
    return {"r": RANK, "lora_alpha": alpha, "alpha_pattern": patterns, "rank_pattern": {},
            "target_modules": sorted(names), "use_rslora": False, "use_dora": False, "lora_bias": False}


def write_peft_by_hand(path, unet_factors, text_factors, unet_config, text_config):
    """diffusers' save_lora_weights layout, written with numpy (no torch): `unet.<m>.lora_A.weight`,
    the configs packed as `component.key` in the `lora_adapter_metadata` JSON."""
    tensors = {}
    for component, factors in (("unet", unet_factors), ("text_encoder", text_factors)):
        for name, (down, up) in factors.items():
            tensors[f"{component}.{name}.lora_A.weight"] = down
            tensors[f"{component}.{name}.lora_B.weight"] = up
    packed = {f"unet.{k}": v for k, v in unet_config.items()} | {f"text_encoder.{k}": v for k, v in text_config.items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def peft_case(params, seed=5):
    unet_state, text_state = torch_state(params, "unet"), torch_state(params, "text_encoder")
    unet_f = make_factors(unet_state, UNET_LINEAR + UNET_CONV, seed)
    text_f = make_factors(text_state, TEXT, seed + 1)
    # One alpha for most layers, another for two of them through alpha_pattern (module names).
    special = {UNET_LINEAR[1]: 16.0, UNET_CONV[0]: 1.0}
    unet_config = peft_metadata(unet_f, 8.0, special)
    text_config = peft_metadata(text_f, 2.0, {})
    modules = {
        "unet": [(n, d, u, special.get(n, 8.0) / RANK) for n, (d, u) in unet_f.items()],
        "text_encoder": [(n, d, u, 2.0 / RANK) for n, (d, u) in text_f.items()],
    }
    return unet_f, text_f, unet_config, text_config, modules, unet_state, text_state


def test_peft_file_merges_as_by_hand(tiny_model, tmp_path):
    params = tiny_model.params
    unet_f, text_f, unet_config, text_config, modules, unet_state, text_state = peft_case(params)
    path = write_peft_by_hand(tmp_path / "peft.safetensors", unet_f, text_f, unet_config, text_config)
    loaded = lora.read_lora(path)
    assert loaded.format == "diffusers"
    out = merged(params, match_quietly(loaded, params), -0.6)
    for component, state in (("unet", unet_state), ("text_encoder", text_state)):
        assert max_difference(torch_state(out, component), hand_merge(state, modules[component], -0.6)) < TOLERANCE


def test_old_diffusers_names_merge_as_by_hand(tiny_model, tmp_path):
    """diffusers' first LoRA format: attention processors' `to_q_lora.down.weight`, the text
    encoder's under the UNet's projection names, `lora.down` elsewhere; no alpha (scale 1)."""
    params = tiny_model.params
    unet_state, text_state = torch_state(params, "unet"), torch_state(params, "text_encoder")
    unet_f = make_factors(unet_state, UNET_LINEAR[:3] + UNET_LINEAR[3:4], 7)
    text_f = make_factors(text_state, TEXT, 8)
    tensors = {}
    for name, (down, up) in unet_f.items():
        head, _, last = name.removesuffix(".0").rpartition(".")
        if last.startswith("to_"):
            stem = f"{head}.processor.{last}_lora"
        else:
            stem = f"{name}.lora"
        # The oldest files have no `unet.` prefix at all.
        tensors[f"{stem}.down.weight"], tensors[f"{stem}.up.weight"] = down, up
    projections = {"q_proj": "to_q", "out_proj": "to_out"}
    for name, (down, up) in text_f.items():
        head, _, last = name.rpartition(".")
        if last in projections:
            stem = f"text_encoder.{head}.{projections[last]}_lora"
        else:
            stem = f"text_encoder.{name}.lora_linear_layer"
        tensors[f"{stem}.down.weight"], tensors[f"{stem}.up.weight"] = down, up
    save_file(tensors, str(tmp_path / "old.safetensors"))
    out = merged(params, match_quietly(lora.read_lora(tmp_path / "old.safetensors"), params), 1.0)
    unet_ref = hand_merge(unet_state, [(n, d, u, 1.0) for n, (d, u) in unet_f.items()], 1.0)
    text_ref = hand_merge(text_state, [(n, d, u, 1.0) for n, (d, u) in text_f.items()], 1.0)
    assert max_difference(torch_state(out, "unet"), unet_ref) < TOLERANCE
    assert max_difference(torch_state(out, "text_encoder"), text_ref) < TOLERANCE


def test_remerge_from_base_leaves_equals_one_merge(tiny_model, tmp_path):
    params = tiny_model.params
    entries, _ = kohya_entries(torch_state(params, "unet"), torch_state(params, "text_encoder"))
    first = match_quietly(lora.read_lora(write_kohya(tmp_path / "a.safetensors", entries)), params)
    entries_b, _ = kohya_entries(torch_state(params, "unet"), torch_state(params, "text_encoder"), seed=9,
                                 alphas=(1.0,))
    second = match_quietly(lora.read_lora(write_kohya(tmp_path / "b.safetensors", entries_b[::2])), params)
    touched = lora.touched_paths([(first, 0.5), (second, 1.0)])
    assert touched == first.paths | second.paths
    base = lora.take_leaves(params, touched)
    at_half = lora.with_leaves(params, lora.merge(base, [(first, 0.5), (second, 1.0)]))
    # Weights changed later: from the kept base values, not from `at_half`.
    again = lora.with_leaves(at_half, lora.merge(base, [(first, -1.2), (second, 0.25)]))
    once = lora.with_leaves(params, lora.merge(lora.take_leaves(params, touched), [(first, -1.2), (second, 0.25)]))
    for component in ("unet", "text_encoder"):
        a, b = torch_state(again, component), torch_state(once, component)
        assert all(np.array_equal(a[k], b[k]) for k in b)
    # Weight 0 gives the base values back exactly.
    zero = lora.merge(base, [(first, 0.0), (second, 0.0)])
    assert all(np.array_equal(zero[p], base[p]) for p in touched)


def test_bfloat16_weights_stay_bfloat16(tiny_model, tmp_path):
    params = tiny_model.params
    entries, _ = kohya_entries(torch_state(params, "unet"), torch_state(params, "text_encoder"))
    matched = match_quietly(lora.read_lora(write_kohya(tmp_path / "a.safetensors", entries)), params)
    base = {p: np.asarray(lora.get_leaf(params, p)).astype(ml_dtypes.bfloat16) for p in matched.paths}
    out = lora.merge(base, [(matched, 0.8)])
    for path, value in out.items():
        assert value.dtype == ml_dtypes.bfloat16
        expected = (base[path].astype(np.float32) + matched.delta(path, 0.8)).astype(ml_dtypes.bfloat16)
        assert np.array_equal(value.view(np.uint16), expected.view(np.uint16))


def test_half_precision_factors_and_pickle(tiny_model, tmp_path):
    """float16 factors read as stored; a pickled LoRA needs trust and then equals its safetensors twin."""
    torch = pytest.importorskip("torch")
    params = tiny_model.params
    entries, _ = kohya_entries(torch_state(params, "unet"), torch_state(params, "text_encoder"))
    half = [(m, d.astype(np.float16), u.astype(np.float16), a) for m, d, u, a in entries]
    a = match_quietly(lora.read_lora(write_kohya(tmp_path / "half.safetensors", half)), params)
    state = {}
    for module, down, up, alpha in half:
        state[f"{module}.lora_down.weight"] = torch.from_numpy(down)
        state[f"{module}.lora_up.weight"] = torch.from_numpy(up)
        if alpha is not None:
            state[f"{module}.alpha"] = torch.tensor(alpha)
    torch.save(state, tmp_path / "half.pt")
    with pytest.raises(ModelLoadError, match="pickle"):
        lora.read_lora(tmp_path / "half.pt")
    b = match_quietly(lora.read_lora(tmp_path / "half.pt", trust_pickle=True), params)
    assert a.paths == b.paths
    for path in a.paths:
        assert np.array_equal(a.delta(path), b.delta(path))


# ---------------------------------------------------------------------------------------------- hashes


def test_short_hash_is_a1111s(tmp_path):
    """A1111 (extensions-builtin/Lora/network.py + modules/hashes.py): metadata's sshs_model_hash if
    there, else sha256 of the bytes after the safetensors header; its first 12 hex digits."""
    rng = np.random.default_rng(0)
    entries = [("lora_unet_x", rng.standard_normal((2, 3)).astype(np.float32), np.zeros((3, 2), np.float32), 1.0)]
    a = write_kohya(tmp_path / "a.safetensors", entries, metadata={"ss_output_name": "alpha one"})
    b = write_kohya(tmp_path / "b.safetensors", entries, metadata={"ss_output_name": "other", "extra": "x" * 100})
    data = a.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    expected = hashlib.sha256(data[8 + length:]).hexdigest()[:12]
    loaded = lora.read_lora(a)
    assert loaded.short_hash == expected and loaded.alias == "alpha one"
    assert lora.read_lora(b).short_hash == expected  # metadata is not hashed
    claimed = "ABCDEF0123456789" * 4
    c = write_kohya(tmp_path / "c.safetensors", entries, metadata={"sshs_model_hash": claimed})
    assert lora.read_lora(c).short_hash == claimed[:12]
    junk = write_kohya(tmp_path / "d.safetensors", entries, metadata={"sshs_model_hash": "<script>"})
    assert lora.read_lora(junk).short_hash == expected
    named = types.SimpleNamespace(name="my:lora,v2", short_hash="0123456789ab")
    assert lora.lora_hashes([named, loaded]) == f"mylorav2: 0123456789ab, a: {expected}"


# ---------------------------------------------------------------------------------------------- what does not match


def test_unmatched_keys_are_one_warning(tiny_model, tmp_path):
    params = tiny_model.params
    entries, _ = kohya_entries(torch_state(params, "unet"), torch_state(params, "text_encoder"))
    rng = np.random.default_rng(1)
    extra = [(f"lora_unet_not_a_layer_{i}", rng.standard_normal((RANK, 8)).astype(np.float32),
              rng.standard_normal((8, RANK)).astype(np.float32), 1.0) for i in range(9)]
    path = write_kohya(tmp_path / "extra.safetensors", entries + extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        matched = lora.match_lora(lora.read_lora(path), params)
    messages = [str(w.message) for w in caught if issubclass(w.category, lora.LoraWarning)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "9 of its" in messages[0] and "lora_unet_not_a_layer_0" in messages[0] and "4 more" in messages[0]
    assert len(matched.paths) == len(entries) and len(matched.unmatched) == 9


def test_a_file_that_matches_nothing_is_an_error(tiny_model, tmp_path):
    params = tiny_model.params
    rng = np.random.default_rng(2)
    def factors(o, i):
        return rng.standard_normal((RANK, i)).astype(np.float32), rng.standard_normal((o, RANK)).astype(np.float32)

    # An SDXL LoRA (second text encoder, SGM names the tiny UNet lacks) on an SD 1.x-shaped model.
    sdxl = [("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", *factors(1280, 1280), 1.0),
            ("lora_unet_input_blocks_7_1_transformer_blocks_3_attn1_to_q", *factors(1280, 1280), 1.0)]
    with pytest.raises(SDMagicError, match="matches none of this model's layers: it looks made for SDXL") as err:
        lora.match_lora(lora.read_lora(write_kohya(tmp_path / "xl.safetensors", sdxl)), params)
    assert "\n" not in str(err.value)
    # An SD 1.x LoRA whose layer exists here with another shape.
    sd1 = [("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", *factors(64, 768), 1.0)]
    with pytest.raises(SDMagicError, match="does not fit this model.*made for SD 1.x") as err:
        lora.match_lora(lora.read_lora(write_kohya(tmp_path / "sd1.safetensors", sd1)), params)
    assert "\n" not in str(err.value)


def test_unsupported_variants_are_left_out_whole(tiny_model, tmp_path):
    params = tiny_model.params
    unet_state = torch_state(params, "unet")
    (name, (down, up)), (other, (down2, up2)) = make_factors(unet_state, UNET_LINEAR[:2], 4).items()
    tensors = {
        f"{kohya_key('lora_unet_', name)}.lora_down.weight": down,
        f"{kohya_key('lora_unet_', name)}.lora_up.weight": up,
        f"{kohya_key('lora_unet_', other)}.lora_down.weight": down2,
        f"{kohya_key('lora_unet_', other)}.lora_up.weight": up2,
        # A middle factor (LoCon's Tucker form): the layer would be wrong without it.
        f"{kohya_key('lora_unet_', other)}.lora_mid.weight": np.zeros((RANK, RANK, 3, 3), np.float32),
    }
    save_file(tensors, str(tmp_path / "mid.safetensors"))
    with pytest.warns(lora.LoraWarning, match="middle factor"):
        matched = lora.match_lora(lora.read_lora(tmp_path / "mid.safetensors"), params)
    assert len(matched.paths) == 1
    tensors[f"{kohya_key('lora_unet_', name)}.dora_scale"] = np.ones((1, 64), np.float32)
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    with pytest.raises(ModelLoadError, match="DoRA"):
        lora.read_lora(tmp_path / "dora.safetensors")


def raw_safetensors(path, header, payload=b""):
    data = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data + payload)
    return path


def test_hostile_and_broken_files_are_one_line_errors(tmp_path):
    good = write_kohya(tmp_path / "good.safetensors",
                       [("lora_unet_conv_in", np.ones((RANK, 4, 3, 3), np.float32),
                         np.ones((32, RANK, 1, 1), np.float32), 1.0)])
    cases = {
        "truncated": lambda p: p.write_bytes(good.read_bytes()[:-20]),
        "empty": lambda p: p.write_bytes(b""),
        "header longer than the file": lambda p: p.write_bytes(struct.pack("<Q", 2**40) + b"{}"),
        "header not json": lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{{{{{" + b"\0" * 8),
        "huge tensor claimed": lambda p: raw_safetensors(p, {"lora_unet_x.lora_down.weight": {
            "dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40000000000]}}, b"\0" * 64),
        "strange dtype": lambda p: raw_safetensors(p, {"lora_unet_x.lora_down.weight": {
            "dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]}}, b"\0" * 4),
        "integer factors": lambda p: save_file({"lora_unet_x.lora_down.weight": np.ones((2, 3), np.int32),
                                               "lora_unet_x.lora_up.weight": np.ones((3, 2), np.int32)}, str(p)),
        "factors that do not multiply": lambda p: save_file({
            "lora_unet_x.lora_down.weight": np.ones((2, 3), np.float32),
            "lora_unet_x.lora_up.weight": np.ones((3, 5), np.float32)}, str(p)),
        "alpha not a number": lambda p: save_file({"lora_unet_x.lora_down.weight": np.ones((2, 3), np.float32),
                                                  "lora_unet_x.lora_up.weight": np.ones((3, 2), np.float32),
                                                  "lora_unet_x.alpha": np.array(np.inf, np.float32)}, str(p)),
        "a model, not a LoRA": lambda p: save_file(
            {"model.diffusion_model.conv_in.weight": np.ones((2, 2), np.float32)}, str(p)),
    }
    for what, make in cases.items():
        path = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        make(path)
        with pytest.raises(ModelLoadError) as err:
            lora.read_lora(path)
        message = str(err.value)
        assert "\n" not in message and len(message) < 300, (what, message)
    with pytest.raises(ModelLoadError, match="not found"):
        lora.read_lora(tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match="pytorch_lora_weights"):
        lora.read_lora(tmp_path)


def test_a_pickle_that_runs_code_is_refused_even_when_trusted(tmp_path):
    pytest.importorskip("torch")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": Payload()}))
    with pytest.raises(ModelLoadError, match="pickle"):
        lora.read_lora(path)
    with pytest.raises(ModelLoadError, match="weights_only") as err:
        lora.read_lora(path, trust_pickle=True)
    assert "\n" not in str(err.value) and not marker.exists()


# ---------------------------------------------------------------------------------------------- PyTorch diffusers


def diffusers_fused(folder, lora_path, weight, xl=False):
    """The UNet and text encoders' PyTorch state dicts after diffusers' load_lora_weights + fuse_lora."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (pip install peft)")
    if xl:
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
        components = ["unet", "text_encoder", "text_encoder_2"]
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                                 requires_safety_checker=False)
        components = ["unet", "text_encoder"]
    lora_path = Path(lora_path)
    pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
    pipe.fuse_lora(components=components, lora_scale=weight)
    out = {}
    with torch.no_grad():
        for component in components:
            state = getattr(pipe, component).state_dict()
            out[component] = {k.replace(".base_layer.", "."): v.float().numpy() for k, v in state.items()
                              if ".lora_" not in k and not k.endswith("position_ids")}
    return out


def test_kohya_file_equals_diffusers_fuse_lora(tiny_dir, tiny_model, tmp_path):
    params = tiny_model.params
    # diffusers gives every layer without an alpha the file's most common alpha (A1111: scale 1),
    # and reads the attention layers' alphas only when they are that common one: so one alpha for
    # the linear layers and another for the conv layers (kohya's network_alpha and conv_alpha).
    entries, _ = kohya_entries(torch_state(params, "unet"), torch_state(params, "text_encoder"), alphas=(8.0,))
    entries = [(m, d, u, 2.0 if d.ndim == 4 and d.shape[2] == 3 else a) for m, d, u, a in entries]
    path = write_kohya(tmp_path / "kohya.safetensors", entries)
    reference = diffusers_fused(tiny_dir, path, 0.8)
    out = merged(params, match_quietly(lora.read_lora(path), params), 0.8)
    for component in ("unet", "text_encoder"):
        assert max_difference(torch_state(out, component), reference[component]) < TOLERANCE
    # The LoRA did change the weights (the comparison is not base against base).
    assert max_difference(torch_state(params, "unet"), reference["unet"]) > 1e-3


def test_peft_file_equals_diffusers_fuse_lora(tiny_dir, tiny_model, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    params = tiny_model.params
    unet_f, text_f, unet_config, text_config, _, _, _ = peft_case(params, seed=11)
    # Written by diffusers' own save_lora_weights, with the adapter configs as its metadata.
    as_torch = lambda fs: {f"{n}.lora_{ab}.weight": torch.from_numpy(t) for n, (d, u) in fs.items()  # noqa: E731
                           for ab, t in (("A", d), ("B", u))}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "saved", unet_lora_layers=as_torch(unet_f), text_encoder_lora_layers=as_torch(text_f),
        unet_lora_adapter_metadata=unet_config, text_encoder_lora_adapter_metadata=text_config,
    )
    loaded = lora.read_lora(tmp_path / "saved")  # the folder save_lora_weights wrote
    assert loaded.name == "saved" and loaded.format == "diffusers"
    out = merged(params, match_quietly(loaded, params), 1.4)
    reference = diffusers_fused(tiny_dir, tmp_path / "saved" / "pytorch_lora_weights.safetensors", 1.4)
    for component in ("unet", "text_encoder"):
        assert max_difference(torch_state(out, component), reference[component]) < TOLERANCE
    assert max_difference(torch_state(params, "unet"), reference["unet"]) > 1e-3


def test_images_with_a_lora_equal_diffusers_fused_pipeline(tiny_dir, tiny_model, tmp_path):
    """The whole point: the pictures. sdmagic's session with the LoRA merged at setup against PyTorch
    diffusers' pipeline after load_lora_weights + fuse_lora, fed the same initial noise."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (pip install peft)")
    import jax.numpy as jnp

    import sdmagic
    from sdmagic.generate import initial_noise

    params = tiny_model.params
    entries, _ = kohya_entries(torch_state(params, "unet"), torch_state(params, "text_encoder"), alphas=(8.0,))
    entries = [(m, d, u, 2.0 if d.ndim == 4 and d.shape[2] == 3 else a) for m, d, u, a in entries]
    path = write_kohya(tmp_path / "style.safetensors", entries)
    prompts, seed, steps, weight = ["a red fox in the snow", "a cat knight"], 21, 4, 0.7

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    pipe.fuse_lora(lora_scale=weight)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    noise = np.asarray(initial_noise(jnp.arange(seed, seed + len(prompts), dtype=jnp.uint32), (4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)))
    with torch.no_grad():
        reference = pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, latents=torch.from_numpy(noise.copy()),
                         output_type="np").images
    reference = (np.asarray(reference) * 255).round().astype(np.int16)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora.LoraWarning)
        session = sdmagic.setup("tiny", lora=[(path, weight)], safety_checker=False, cache=False)
    try:
        ours = np.stack([np.asarray(i, np.int16) for i in session.generate(prompts, seed=seed, steps=steps).images])
        session.set_lora(path, 0)
        base = np.stack([np.asarray(i, np.int16) for i in session.generate(prompts, seed=seed, steps=steps).images])
    finally:
        session.close()
    difference = np.abs(ours - reference)
    assert difference.max() <= 2, f"max {difference.max()} levels, mean {difference.mean():.4f}"
    assert np.abs(base - reference).max() > 10  # the LoRA changed the pictures: not base against base


# ---------------------------------------------------------------------------------------------- SDXL


def sdxl_available():
    return "tiny-sdxl" in tiny.RANDOM_ARCHITECTURES


@pytest.fixture(scope="module")
def tiny_sdxl():
    if not sdxl_available():
        pytest.skip("sdmagic.tiny has no 'tiny-sdxl' architecture yet")
    return tiny.random_model("tiny-sdxl")


# Layers of tiny-sdxl (three levels; a transformer depth of 2 at the last) under their SGM names.
SDXL_SGM = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k": "input_blocks.8.1.transformer_blocks.1.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj": "middle_block.1.transformer_blocks.1.ff.net.0.proj",
    "up_blocks.0.attentions.2.proj_out": "output_blocks.2.1.proj_out",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.resnets.1.conv2": "input_blocks.2.0.out_layers.3",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.0.conv_shortcut": "output_blocks.6.0.skip_connection",
}
# With out_proj, as every kohya file has: without it diffusers takes the text encoders' keys for its
# newer format and drops the attention ones (a diffusers 0.39 quirk, not what is tested here).
SDXL_TEXT = ["text_model.encoder.layers.0.self_attn.k_proj", "text_model.encoder.layers.1.self_attn.out_proj",
             "text_model.encoder.layers.1.mlp.fc2"]


def sdxl_case(params):
    unet_state = torch_state(params, "unet")
    texts = {c: torch_state(params, c) for c in ("text_encoder", "text_encoder_2")}
    unet_f = make_factors(unet_state, list(SDXL_SGM), 21)
    text_f = {c: make_factors(texts[c], SDXL_TEXT, 22 + i) for i, c in enumerate(texts)}
    entries = [(kohya_key("lora_unet_", SDXL_SGM[n]), d, u, 4.0 if d.ndim == 4 and d.shape[2] == 3 else 2.0)
               for n, (d, u) in unet_f.items()]
    for component, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        entries += [(kohya_key(prefix, n), d, u, 2.0) for n, (d, u) in text_f[component].items()]
    modules = {"unet": [(n, d, u, (4.0 if d.ndim == 4 and d.shape[2] == 3 else 2.0) / RANK)
                        for n, (d, u) in unet_f.items()]}
    for component in texts:
        modules[component] = [(n, d, u, 2.0 / RANK) for n, (d, u) in text_f[component].items()]
    return entries, modules, {"unet": unet_state, **texts}


def test_sdxl_kohya_file_merges_as_by_hand(tiny_sdxl, tmp_path):
    params = tiny_sdxl.params
    entries, modules, states = sdxl_case(params)
    matched = match_quietly(lora.read_lora(write_kohya(tmp_path / "xl.safetensors", entries)), params)
    assert len(matched.paths) == len(entries)
    assert {p[0] for p in matched.paths} == {"unet", "text_encoder", "text_encoder_2"}
    out = merged(params, matched, 0.9)
    for component, state in states.items():
        assert max_difference(torch_state(out, component), hand_merge(state, modules[component], 0.9)) < TOLERANCE


def test_sdxl_kohya_file_equals_diffusers_fuse_lora(tiny_sdxl, tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (pip install peft)")
    folder = tiny.write_random_model(tmp_path / "tiny-sdxl", "tiny-sdxl")
    params = tiny_sdxl.params
    entries, _, _ = sdxl_case(params)
    path = write_kohya(tmp_path / "xl.safetensors", entries)
    reference = diffusers_fused(folder, path, 0.9, xl=True)
    out = merged(params, match_quietly(lora.read_lora(path), params), 0.9)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        assert max_difference(torch_state(out, component), reference[component]) < TOLERANCE
    assert max_difference(torch_state(params, "text_encoder_2"), reference["text_encoder_2"]) > 1e-3


def test_peft_metadata_is_read_literally_and_safely(tiny_model, tmp_path):
    """alpha_pattern keys are module names (or dotted suffixes, `^` for the whole name), first match
    wins as in PEFT; regex syntax is never evaluated; junk metadata falls back to scale 1."""
    params = tiny_model.params
    unet_f = make_factors(torch_state(params, "unet"), UNET_LINEAR[:3], 13)
    q, k, out = UNET_LINEAR[:3]
    patterns = {"attn1.to_q": 2.0, f"^{k}": 12.0, "^attn1.to_out.0": 99.0, "to_out.0": 6.0, "(.*)*x": 50.0}
    config = peft_metadata(unet_f, 8.0, patterns)
    path = write_peft_by_hand(tmp_path / "p.safetensors", unet_f, {}, config, {})
    scales = {m.module.name: m.module.scale for m in match_quietly(lora.read_lora(path), params).modules}
    assert scales == {f"unet.{q}": 2.0 / RANK, f"unet.{k}": 12.0 / RANK, f"unet.{out}": 6.0 / RANK}
    # A huge pattern table is dictionary lookups, not a scan per layer.
    big = peft_metadata(unet_f, 4.0, {f"layer_{i}.to_v": 1.0 for i in range(200_000)})
    path = write_peft_by_hand(tmp_path / "big.safetensors", unet_f, {}, big, {})
    assert {m.scale for m in lora.read_lora(path).modules.values()} == {1.0}
    # Metadata nested beyond the JSON parser's depth, or not JSON: no config, scale 1.
    for raw in ("[" * 100_000 + "]" * 100_000, "not json"):
        tensors = {f"unet.{q}.lora_A.weight": unet_f[q][0], f"unet.{q}.lora_B.weight": unet_f[q][1]}
        save_file(tensors, str(tmp_path / "deep.safetensors"), metadata={"lora_adapter_metadata": raw})
        assert [m.scale for m in lora.read_lora(tmp_path / "deep.safetensors").modules.values()] == [1.0]
    # DoRA said in the metadata: refused, not merged as a plain LoRA.
    dora = dict(config, use_dora=True)
    with pytest.raises(ModelLoadError, match="DoRA"):
        lora.read_lora(write_peft_by_hand(tmp_path / "dora.safetensors", unet_f, {}, dora, {}))


def test_a_lycoris_only_file_says_so(tmp_path):
    tensors = {f"lora_unet_conv_in.hada_w{i}_{ab}": np.ones((2, 2), np.float32) for i in (1, 2) for ab in "ab"}
    save_file(tensors, str(tmp_path / "loha.safetensors"))
    with pytest.raises(ModelLoadError, match="LoHa file: sdmagic merges plain LoRA"):
        lora.read_lora(tmp_path / "loha.safetensors")
