"""Wan2.1 weights in and out: vdit's DiT equals diffusers' WanTransformer3DModel after `vdit import`,
alone and on a packed row of several samples, and `vdit export --format=diffusers` gives back the
original tensors bit for bit. Tiny random models (no download); needs torch and diffusers (the
`parity` extra, installed by `make test`)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from vdit.cli import run as cli_run  # noqa: E402
from vdit.data.packing import patchify, unpatchify  # noqa: E402
from vdit.interop import diffusers_io, wan_dit  # noqa: E402
from vdit.train import load  # noqa: E402

# configs/wan.py:tiny's sizes (pixel space: 3 channels)
TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=3,
    out_channels=3,
    text_dim=32,
    freq_dim=256,
    ffn_dim=160,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
# Fixed float32 tolerances: max |vdit - diffusers| relative to max |diffusers|.
REL_TOL = 2e-5


def _wan(seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():  # every tensor random (norm scales and biases too), not its init
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias") or "proj_out" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(diffusers model, its folder (sharded), the `vdit import` of it)."""
    root = tmp_path_factory.mktemp("wan")
    model = _wan()
    src = str(root / "diffusers")
    model.save_pretrained(src, max_shard_size="100KB")  # several shards and an index
    assert os.path.isfile(os.path.join(src, diffusers_io.INDEX))
    out = str(root / "imported")
    cli_run(["import", "--config=configs/wan.py:tiny", f"--from={src}", f"--out={out}"])
    return model, src, out


def _diffusers_out(model, latent: np.ndarray, t: float, text: np.ndarray) -> np.ndarray:
    """diffusers on one sample: latent (T, H, W, C) -> velocity (T, H, W, C)."""
    x = torch.from_numpy(latent).permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        y = model(
            x,
            torch.tensor([1000.0 * t], dtype=torch.float32),
            torch.from_numpy(text)[None],
            return_dict=False,
        )[0]
    return y[0].permute(1, 2, 3, 0).numpy()


def _vdit_row(module, samples, row_len: int, text_len: int):
    """vdit on one packed row of samples [(latent, t, text)] -> each sample's velocity."""
    patches, positions, seg, t_tok, spans = [], [], [], [], []
    texts, tseg = [], []
    for i, (latent, t, text) in enumerate(samples, start=1):
        p, pos = patchify(latent, (1, 2, 2))
        spans.append((sum(len(x) for x in patches), len(p), latent.shape))
        patches.append(p)
        positions.append(pos)
        seg.append(np.full(len(p), i, np.int32))
        t_tok.append(np.full(len(p), t, np.float32))
        texts.append(text)
        tseg.append(np.full(len(text), i, np.int32))

    def pad(parts, n, value=0):
        a = np.concatenate(parts)
        width = [(0, n - len(a))] + [(0, 0)] * (a.ndim - 1)
        return np.pad(a, width, constant_values=value)[None]

    out = module(
        pad(patches, row_len).astype(np.float32),
        pad(positions, row_len),
        pad(seg, row_len),
        pad(t_tok, row_len),
        pad(texts, text_len).astype(np.float32),
        pad(tseg, text_len),
    )
    out = np.asarray(out)[0]
    return [unpatchify(out[s : s + n], shape[:3], (1, 2, 2)) for s, n, shape in spans]


def _rel(got, ref) -> tuple[float, float]:
    err = float(np.abs(got - ref).max())
    return err, err / float(np.abs(ref).max())


def _report(name: str, err: float, rel: float) -> None:
    print(f"parity | {name} | max abs {err:.3e} | rel {rel:.3e}")


def test_imported_transformer_equals_diffusers(imported):
    model, _, out = imported
    module = load.load(out).model()
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((3, 8, 12, 3)).astype(np.float32)
    text = rng.standard_normal((7, 32)).astype(np.float32)
    for t in (0.25, 0.875):
        ref = _diffusers_out(model, latent, t, text)
        (got,) = _vdit_row(module, [(latent, t, text)], row_len=72, text_len=7)
        err, rel = _rel(got, ref)
        _report(f"one sample, t={t}", err, rel)
        assert np.abs(ref).max() > 0.1  # a real signal, not zeros
        assert rel < REL_TOL, (err, rel)


def test_packed_row_equals_diffusers_on_each_sample_alone(imported):
    model, _, out = imported
    module = load.load(out).model()
    rng = np.random.default_rng(1)
    shapes = [(2, 8, 8, 3), (1, 8, 12, 3), (3, 4, 8, 3)]  # a video, an image, another video
    samples = [
        (
            rng.standard_normal(s).astype(np.float32),
            t,
            rng.standard_normal((n, 32)).astype(np.float32),
        )
        for s, t, n in zip(shapes, (0.125, 0.5, 0.9375), (5, 9, 3), strict=True)
    ]
    got = _vdit_row(module, samples, row_len=96, text_len=24)  # padding after the samples
    for i, ((latent, t, text), g) in enumerate(zip(samples, got, strict=True)):
        ref = _diffusers_out(model, latent, t, text)
        err, rel = _rel(g, ref)
        _report(f"packed row, sample {i} {latent.shape[:3]} t={t}", err, rel)
        assert rel < REL_TOL, (i, err, rel)


def test_export_gives_back_the_original_tensors(imported, tmp_path):
    model, src, out = imported
    back = str(tmp_path / "diffusers")
    cli_run(["export", f"--workdir={out}", f"--out={back}", "--format=diffusers"])
    again = diffusers.WanTransformer3DModel.from_pretrained(back)
    ref, got = model.state_dict(), again.state_dict()
    assert set(ref) == set(got)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name  # bit for bit
    _report("export round trip (tensor for tensor)", 0.0, 0.0)
    with open(os.path.join(back, diffusers_io.CONFIG)) as f:
        cfg = json.load(f)
    assert {k: cfg[k] for k in TINY} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()
    }


def test_bad_tensors_are_named_in_one_error(imported):
    _, src, out = imported
    c = load.read_export(out)[1]
    with diffusers_io.Tensors(src) as source:
        tensors = {n: source[n] for n in source}
    tensors.pop("blocks.1.attn2.to_k.weight")
    tensors["blocks.0.extra.weight"] = np.zeros(3, np.float32)
    tensors["proj_out.weight"] = np.zeros((5, 64), np.float32)
    with pytest.raises(ValueError) as e:
        wan_dit.params_from_diffusers(tensors, c)
    msg = str(e.value)
    assert "1 missing (blocks.1.attn2.to_k.weight)" in msg
    assert "1 unknown (blocks.0.extra.weight)" in msg
    assert "proj_out.weight is (5, 64), expected (12, 64)" in msg


def test_unsupported_diffusers_settings_are_refused(imported):
    _, _, out = imported
    base = load.read_export(out)[1]
    with pytest.raises(ValueError, match="image_dim.*image-to-video"):
        wan_dit.config_from_diffusers({**TINY, "image_dim": 1280}, base)
    with pytest.raises(ValueError, match="unknown settings"):
        wan_dit.config_from_diffusers({**TINY, "window": 3}, base)


def _vdit(capsys, *args) -> tuple[int, str]:
    try:
        cli_run(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_cli_errors_are_one_line(imported, tmp_path, capsys):
    _, src, out = imported
    code, err = _vdit(
        capsys,
        "import",
        "--config=configs/wan.py:tiny",
        f"--from={tmp_path}/no",
        f"--out={tmp_path}/o",
    )
    assert code == 2 and err.count("\n") == 1 and "no such directory" in err, err
    code, err = _vdit(
        capsys, "import", "--config=configs/wan.py:tiny", f"--from={src}", f"--out={out}"
    )
    assert code == 2 and "exists and is not an empty directory" in err, err
    # a DiT Wan's class cannot hold is refused by name
    c = load.read_export(out)[1]
    with c.unlocked():
        c.model.cross_norm = "rms"
    with pytest.raises(ValueError, match="cross_norm='rms'"):
        wan_dit.diffusers_config(c)
    with c.unlocked():
        c.model.cross_norm, c.model.pos_embed = "layer", "fractional"
    with pytest.raises(ValueError, match="pos_embed='fractional'"):
        wan_dit.diffusers_config(c)
    with c.unlocked():
        c.model.pos_embed, c.model.text_pool = "none", True
    with pytest.raises(ValueError, match="text_pool=True"):
        wan_dit.diffusers_config(c)
