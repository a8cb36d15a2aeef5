"""vdit's Wan VAE (`VAEConfig(arch="wan")`) against diffusers' AutoencoderKLWan in PyTorch: a tiny
random model (nothing downloaded) mapped by vdit/interop/wan_vae.py encodes and decodes as diffusers
does, and maps back tensor for tensor into a folder diffusers' from_pretrained reads."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tiny import ROOT  # noqa: E402

from vdit import configlib  # noqa: E402
from vdit.interop import wan_vae  # noqa: E402
from vdit.models import vae, vae_chunked  # noqa: E402

Z = 4
# float32 tolerance of outputs of magnitude ~1 (measured errors are below 1e-6: BUILD.md, "Causal VAE")
ATOL = 2e-5


@pytest.fixture(scope="module")
def pair():
    """(diffusers model, its state dict as numpy, the vdit config, the mapped vdit model)."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=Z,
        latents_mean=[0.25 * i - 0.5 for i in range(Z)],
        latents_std=[1.0 + 0.5 * i for i in range(Z)],
    ).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so their layout matters
        for name, p in ref.named_parameters():
            if name.endswith(("gamma", "bias")):
                p.add_(0.2 * torch.randn_like(p))
    sd = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
    c = wan_vae.vae_config_from_diffusers(dict(ref.config))
    params, buffers = wan_vae.params_from_diffusers(sd, c)
    model = build(c, params, buffers)
    return ref, sd, c, model


def build(c, params, buffers):
    cfg = configlib.vae_config(c)
    abstract = nnx.eval_shape(lambda: vae.CausalVAE3D(cfg, rngs=nnx.Rngs(0)))
    graphdef, p, b = nnx.split(abstract, nnx.Param, vae.LatentStat)
    nnx.replace_by_pure_dict(p, jax.tree.map(jnp.asarray, params))
    nnx.replace_by_pure_dict(b, jax.tree.map(jnp.asarray, buffers))
    return nnx.merge(graphdef, p, b)


def to_torch_layout(x):  # (B, T, H, W, C) -> (B, C, T, H, W)
    return np.asarray(x).transpose(0, 4, 1, 2, 3)


def err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max()), float(np.abs(a - b).max() / np.abs(b).max())


def test_config_maps_the_architecture(pair):
    _, _, c, model = pair
    cfg = configlib.vae_config(c)
    assert (cfg.arch, cfg.base_channels, cfg.latent_channels) == ("wan", 8, Z)
    assert cfg.channel_mults == (1, 2, 4, 4) and cfg.blocks_per_level == 2
    assert cfg.temporal_down == (False, True, True) and cfg.compression == (4, 8, 8)
    np.testing.assert_allclose(model.latent_mean[...], [0.25 * i - 0.5 for i in range(Z)], 1e-6)
    np.testing.assert_allclose(model.latent_std[...], [1.0 + 0.5 * i for i in range(Z)], 1e-6)


def test_encode_equals_diffusers(pair):
    """Posterior mean and log-variance of 9 frames of 32x32: diffusers encodes the first frame, then
    4 frames at a time with feature caches; vdit the whole video at once."""
    ref, _, _, model = pair
    x, post = encoded_by_diffusers(ref)
    mean, logvar = vae.encode_full(model, jnp.asarray(x))  # `vdit encode --chunk_frames=0`
    assert to_torch_layout(mean).shape == tuple(post.mean.shape) == (1, Z, 3, 4, 4)
    e_mean, e_logvar = (
        err(to_torch_layout(mean), post.mean),
        err(to_torch_layout(logvar), post.logvar),
    )
    print(f"encode mean {e_mean}, logvar {e_logvar}")
    for e in (e_mean, e_logvar):
        assert e[0] < ATOL, e


@pytest.mark.slow
def test_chunked_encode_and_decode_equal_diffusers(pair):
    """vdit's chunked runs with the causal caches of vae_chunked equal diffusers too: `vdit
    encode`'s (its encode_video, chunks of 4 frames, of a uint8 video) and the sampler's decoder's
    (one latent frame at a time here)."""
    from vdit.encode import EncodeOptions, encode_video

    ref, _, _, model = pair
    u8 = np.random.default_rng(2).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    x = u8.astype(np.float32)[None] / 127.5 - 1.0
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(to_torch_layout(x).copy())).latent_dist
    mean, logvar = encode_video(model, u8, EncodeOptions(chunk_frames=4))
    z, raw, _ = decoded_by_diffusers(ref)
    video = vae_chunked.decode_chunked(model, jnp.asarray(z), 1)
    errors = (
        err(to_torch_layout(mean[None]), post.mean),
        err(to_torch_layout(logvar[None]), post.logvar),
        err(to_torch_layout(video), raw),
    )
    print(f"chunked encode mean {errors[0]}, logvar {errors[1]}, chunked decode {errors[2]}")
    for e in errors:
        assert e[0] < ATOL, e


def encoded_by_diffusers(ref):
    x = np.random.default_rng(0).uniform(-1, 1, (1, 9, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        return x, ref.encode(torch.from_numpy(to_torch_layout(x).copy())).latent_dist


def decoded_by_diffusers(ref):
    """(latents (1, 3, 4, 4, Z), diffusers' decoder output before the clamp of `decode`, and
    `decode`'s clamped output), both (B, C, T, H, W)."""
    z = np.random.default_rng(1).standard_normal((1, 3, 4, 4, Z)).astype(np.float32)
    zt = torch.from_numpy(to_torch_layout(z).copy())
    with torch.no_grad():
        clamped = ref.decode(zt).sample.numpy()
        ref.clear_cache()  # diffusers' own per-frame loop, without the clamp
        h, frames = ref.post_quant_conv(zt), []
        for i in range(zt.shape[2]):
            ref._conv_idx = [0]
            frames.append(
                ref.decoder(
                    h[:, :, i : i + 1], ref._feat_map, ref._conv_idx, first_chunk=i == 0
                ).numpy()
            )
        ref.clear_cache()
    return z, np.concatenate(frames, 2), clamped


def test_decode_equals_diffusers(pair):
    """3 latent frames of 4x4 -> 9 frames of 32x32: diffusers decodes one latent frame at a time.
    Its decoder output before the [-1, 1] clamp of `decode`, and `decode` itself (clamped)."""
    ref, _, _, model = pair
    z, raw, clamped = decoded_by_diffusers(ref)
    ours = to_torch_layout(vae.decode_full(model, jnp.asarray(z)))
    assert ours.shape == raw.shape == (1, 3, 9, 32, 32)
    e_raw, e_clamped = err(ours, raw), err(np.clip(ours, -1, 1), clamped)
    print(f"decode raw {e_raw}, clamped {e_clamped}")
    assert np.abs(raw).max() > 0.5  # a real signal, not a vanishing one
    for e in (e_raw, e_clamped):
        assert e[0] < ATOL, e


def test_export_equals_the_original_and_loads_in_diffusers(pair, tmp_path):
    """params_to_diffusers of the mapped parameters == the state dict, name for name and bit for
    bit; written with diffusers_config it loads with from_pretrained as the same model."""
    from safetensors.numpy import save_file

    ref, sd, c, model = pair
    _, params, buffers = nnx.split(model, nnx.Param, vae.LatentStat)
    params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
    out = wan_vae.params_to_diffusers(params, buffers, c)
    assert list(out) != [] and set(out) == set(sd)
    for name, t in sd.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        np.testing.assert_array_equal(out[name], t, err_msg=name)
    config = wan_vae.diffusers_config(c, buffers)
    assert config["latents_mean"] == ref.config.latents_mean
    assert config["latents_std"] == ref.config.latents_std
    save_file(out, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = diffusers.AutoencoderKLWan.from_pretrained(str(tmp_path))
    ref_cfg = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == ref_cfg
    for name, t in loaded.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), sd[name], err_msg=name)


def test_mismatched_tensors_are_all_named(pair):
    _, sd, c, _ = pair
    bad = dict(sd)
    del bad["encoder.conv_in.weight"], bad["decoder.mid_block.attentions.0.norm.gamma"]
    bad["encoder.extra.weight"] = np.zeros(3, np.float32)
    bad["quant_conv.weight"] = np.zeros((8, 8, 3, 1, 1), np.float32)
    with pytest.raises(ValueError) as e:
        wan_vae.params_from_diffusers(bad, c)
    msg = str(e.value)
    assert "\n" not in msg
    for part in (
        "2 missing (decoder.mid_block.attentions.0.norm.gamma, encoder.conv_in.weight)",
        "1 unknown (encoder.extra.weight)",
        "1 mis-shaped (quant_conv.weight is (8, 8, 3, 1, 1), expected (8, 8, 1, 1, 1))",
    ):
        assert part in msg, msg
    _, params, buffers = nnx.split(pair[3], nnx.Param, vae.LatentStat)
    params = nnx.to_pure_dict(params)
    del params["decoder"]["conv_out"]
    with pytest.raises(ValueError, match=r"2 missing \(decoder.conv_out.bias, decoder.conv_out"):
        wan_vae.params_to_diffusers(params, nnx.to_pure_dict(buffers), c)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"is_residual": True}, "is_residual"),
        ({"patch_size": 2}, "patch_size"),
        ({"attn_scales": [0.5]}, "attn_scales"),
        ({"decoder_base_dim": 16}, "decoder_base_dim"),
        ({"scale_factor_spatial": 16}, "scale_factor_spatial"),
        ({"clip_output": True}, "unknown settings \\['clip_output'\\]"),
        ({"_class_name": "AutoencoderKL"}, "_class_name"),
        ({"latents_mean": [0.0] * 3}, "vae.latent_mean: 3 values"),
    ],
)
def test_unsupported_configs_are_refused_by_name(pair, change, field):
    cfg = {**dict(pair[0].config), **change}
    with pytest.raises(ValueError, match=field):
        wan_vae.vae_config_from_diffusers(cfg)


def test_wan_arch_fixes_its_fields():
    with pytest.raises(ValueError, match="pad_mode: 'replicate' is not Wan's"):
        vae.VAEConfig(arch="wan", mid_attention=True)
    with pytest.raises(ValueError, match="arch: 'sd'"):
        vae.VAEConfig(arch="sd")


def test_full_size_config_has_diffusers_tensors():
    """configs/wan_vae.py (Wan2.1's VAE, base 96) maps to the very names and shapes of diffusers'
    default AutoencoderKLWan (built on torch's meta device: no memory, no weights)."""
    from tiny import load_config_module

    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan()
    c = load_config_module(f"{ROOT}/configs/wan_vae.py").get_config()
    table = wan_vae.mapping(c)
    assert {d: s for d, (_, _, _, s) in table.items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }
    assert wan_vae.parameter_count(c) == 126_892_531
    assert configlib.vae_config(c).latent_mean == tuple(ref.config.latents_mean)
    got = wan_vae.diffusers_config(c)
    assert got == {k: v for k, v in ref.config.items() if not k.startswith("_")} | {
        "_class_name": "AutoencoderKLWan"
    }


@pytest.mark.slow
def test_vdit_encode_of_an_imported_vae_equals_diffusers(pair, tmp_path):
    """The mapped VAE written as a `vdit export` directory (what an import writes: its tensors,
    config.json, export.json) is a `vdit encode --vae`: the stored latents of a record are
    diffusers' posterior mean and log-variance of the same pixels, the manifest its statistics."""
    from vdit import encode
    from vdit.data import latents, records
    from vdit.export import tensors
    from vdit.train import load

    ref, _, c, model = pair
    _, params, buffers = nnx.split(model, nnx.Param, vae.LatentStat)
    named = {**tensors.names(nnx.to_pure_dict(params)), **tensors.names(nnx.to_pure_dict(buffers))}
    named = {n: np.asarray(x) for n, x in named.items()}
    vae_dir = tmp_path / "vae"
    tensors.write(
        str(vae_dir), named, dtype=np.dtype("float32"), max_file_bytes=1 << 20, metadata={}
    )
    (vae_dir / load.EXPORT_CONFIG).write_text(c.to_json_best_effort())
    meta = {"format": "safetensors", "step": 0, "params": "raw"}
    (vae_dir / load.EXPORT).write_text(json.dumps(meta))
    video = np.random.default_rng(3).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "records").mkdir()
    writer = records.ShardWriter(str(tmp_path / "records"), shard_size=4)
    writer.write(records.encode_record(video, "a clip", 8.0, "clip"))
    writer.close()
    out = tmp_path / "latents"
    manifest = encode.encode_dataset(
        str(vae_dir),
        str(tmp_path / "records"),
        str(out),
        encode.EncodeOptions(chunk_frames=4),
        devices=jax.local_devices()[:1],
    )
    assert manifest["written"] == 1 and manifest["vae"]["latent_std"] == ref.config.latents_std
    stored = latents.LatentsSource(str(out))[0]
    x = video.astype(np.float32)[None] / 127.5 - 1.0  # 9 frames of 32x32: no resizing
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(to_torch_layout(x).copy())).latent_dist
    assert err(to_torch_layout(stored["mean"][None]), post.mean)[0] < ATOL
    assert err(to_torch_layout(stored["logvar"][None]), post.logvar)[0] < ATOL


def test_import_and_export_diffusers_of_the_vae(pair, tmp_path):
    """`vdit import`'s VAE step (transfer._import_vae on a diffusers vae/ folder) writes an export
    directory that `load()` reads as the Wan VAE with its statistics, and `vdit export
    --format=diffusers` of it gives a folder from_pretrained reads with the original tensors."""
    from safetensors.numpy import save_file

    from vdit.interop import transfer
    from vdit.train import load

    ref, sd, c, model = pair
    src = tmp_path / "vae"
    src.mkdir()
    save_file(sd, str(src / "diffusion_pytorch_model.safetensors"))
    (src / "config.json").write_text(json.dumps(dict(ref.config)))
    imported = tmp_path / "imported"
    transfer._import_vae(str(src), str(imported), "float32", 1 << 20)
    loaded = load.load(str(imported))
    assert loaded.config.vae.arch == "wan"
    np.testing.assert_allclose(
        np.asarray(loaded.buffers["latent_std"]).ravel(), ref.config.latents_std, rtol=1e-6
    )
    out = tmp_path / "exported"
    summary = transfer.export_diffusers(str(imported), str(out))
    assert summary["class"] == "AutoencoderKLWan" and summary["tensors"] == len(sd)
    back = diffusers.AutoencoderKLWan.from_pretrained(str(out))
    for name, t in back.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), sd[name], err_msg=name)
    assert list(back.config.latents_mean) == list(ref.config.latents_mean)
