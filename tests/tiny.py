"""A tiny config shared by the tests: the "mu" model on short rows, so every compile is quick."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.py")


def load_config_module(path: str = DEFAULT_CONFIG):
    spec = importlib.util.spec_from_file_location("vdit_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(variant: str = "mu/4"):
    c = load_config_module().get_config(variant)
    c.model.text.width = 32
    c.model.text.depth = 1
    c.model.text.heads = 2
    c.model.text.max_len = 32
    c.data.synthetic.frame_choices = (4,)
    c.data.synthetic.size_choices = ((16, 16), (16, 32), (32, 16))
    c.data.batch_rows = 8
    c.data.row_len = 256
    c.data.text_len = 128
    c.data.max_samples_per_row = 8
    c.data.packing_bins = 8
    c.data.max_tokens_per_sample = 256
    c.train.steps = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.progress = False
    c.sample.steps = 2
    c.sample.grid_prompts = ("a red square moves right", "a blue circle stands still")
    c.sample.grid_shape = (4, 16, 16)
    c.mesh.data = -1
    c.data.eval_samples = 0  # no held-out eval_loss (its compile); tests/test_sweep.py turns it on
    return c


def restore_state(workdir, step=None):
    """The whole train state (params, optimizer, EMA, counters) of WORKDIR/checkpoints on one
    device, as host arrays: for comparing runs (the inference loader reads parameters only)."""
    import jax
    import ml_collections

    from vdit import configlib
    from vdit.train.checkpoint import Checkpointer, read_config

    directory = os.path.join(os.fspath(workdir), "checkpoints")
    c = configlib.load(ml_collections.ConfigDict(read_config(directory, step)))
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1})
    if c.get("kind", "dit") == "vae":
        from vdit.train.vae_task import VAETask

        task = VAETask(c, jax.devices()[:1])
    else:
        from vdit.train.dit_task import DiTTask

        task = DiTTask(c, jax.devices()[:1], data=False)
    with Checkpointer(directory, save_every=1, keep=None) as ckpt:
        state, _ = ckpt.restore(task.state.abstract_sharded(), step=step)
    return jax.device_get(state)
