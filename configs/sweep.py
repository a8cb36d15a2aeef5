"""A compute-scaling (IsoFLOP) sweep: budgets x model sizes, each run an ordinary `vdit train`.

    vdit sweep --config=configs/sweep.py --workdir=runs/sweep --dry_run     # the plan, nothing run
    vdit sweep --config=configs/sweep.py --workdir=runs/sweep               # run (or continue), fit
    vdit sweep --config=configs/sweep.py:smoke --workdir=runs/sweep_smoke   # a few minutes
    vdit sweep --config=configs/sweep.py:cluster --workdir=runs/sweep_cluster --launch_only  # launch.sh

Variants after ':': "cpu" (the default: the embedded procedural data, 3 budgets x 4 sizes, under 45
minutes on 2 CPU cores), "smoke" (2 budgets x 3 tiny sizes, every output in a few minutes) and
"cluster" (widths 384..1024 at B/2's patch on 256-row batches, budgets 1e17..1e19, bf16; point
base.data at real records), written out as launches with --launch_only. `base` is a whole
configs/default.py training config: every run is it with its own width/depth/heads, train.steps
and optim.warmup_steps (--config.base.FIELD=VALUE overrides it).
"""

import importlib.util
import os

import ml_collections


def _default(variant: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    spec = importlib.util.spec_from_file_location("vdit_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _cpu_base(variant: str = "mu/4") -> ml_collections.ConfigDict:
    """The embedded procedural data on short rows, a small text encoder, quick sample grids."""
    b = _default(variant)
    b.model.text.width = 32
    b.model.text.depth = 1
    b.model.text.heads = 2
    b.model.text.max_len = 32
    b.data.synthetic.frame_choices = (4,)
    b.data.synthetic.size_choices = ((16, 16), (16, 32), (32, 16), (32, 32))
    b.data.batch_rows = 4
    b.data.row_len = 256
    b.data.text_len = 128
    b.data.max_samples_per_row = 8
    b.data.packing_bins = 8
    b.data.max_tokens_per_sample = 256
    b.data.eval_samples = 64
    b.optim.lr = 2e-3
    b.train.log_every = 25
    b.train.checkpoint_every = 500  # (steps) a stopped run resumes from its last one
    b.train.keep_checkpoints = 1
    b.train.progress = False
    b.train.eval_every = 0
    b.sample.steps = 10
    b.sample.grid_prompts = ()  # no per-run grid; the sweep draws its own across budgets
    b.sample.grid_shape = (4, 32, 32)
    return b


GRID_PROMPTS = (
    "a red square moves right",
    "a blue circle moves up",
    "a green square moves left",
    "a yellow circle moves down",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "cpu"
    c = ml_collections.ConfigDict()
    if variant in ("cpu", "smoke"):
        c.base = _cpu_base()  # the training config every run starts from
    elif variant == "cluster":
        c.base = _default("B/2")
        c.base.model.dtype = "bfloat16"
        c.base.data.batch_rows = 256
        c.base.data.eval_samples = 1024
        c.base.train.eval_every = 1000
        c.base.train.progress = False
    else:
        raise ValueError(f"configs/sweep.py:{variant}: choose cpu, smoke or cluster")
    # the sweep's own fixed-seed grid (samples_by_compute.*): the best run of each budget
    c.grid_prompts = GRID_PROMPTS  # with seed 0; the runs' base.sample.steps and cfg_scale
    c.grid_shape = tuple(c.base.sample.grid_shape)  # (frames, height, width) of its samples
    c.min_steps = 100  # runs with fewer steps are left out (and listed)
    if variant == "cpu":
        # (width, depth, heads): the model family, N growing ~2x a step
        c.sizes = ((32, 2, 2), (48, 2, 2), (64, 3, 4), (96, 3, 4))
        c.budgets = (5e11, 1e12, 2e12)  # C: training FLOPs of each IsoFLOP curve
    elif variant == "smoke":
        c.sizes = ((16, 1, 2), (32, 2, 2), (48, 2, 2))
        c.budgets = (4e10, 8e10)
        c.min_steps = 40
    else:
        c.sizes = ((384, 12, 6), (512, 12, 8), (640, 14, 10), (768, 16, 12), (1024, 20, 16))
        c.budgets = (1e17, 1e18, 1e19)
    c.max_steps = 100_000  # runs with more steps are left out (and listed)
    c.warmup_fraction = 0.1  # optim.warmup_steps = this share of a run's steps (cosine after)
    c.flops_batches = 8  # packed batches of the run's data its FLOPs per step are averaged over
    c.time_steps = 2  # `--dry_run`: timed train steps per size for the estimated times (0: none)
    c.bootstrap = 1000  # bootstrap replicates of the fits' intervals
    c.bootstrap_seed = 0
    return c
