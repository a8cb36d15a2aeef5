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
    return c
