"""The embedded default: a tiny text-to-video DiT trained on CPU on procedural captioned videos.

Pixel space (identity autoencoder), 1x4x4 patches, native sizes packed into 1024-token rows.

    vdit train --config=configs/default.py --workdir=runs/default
    vdit train --config=configs/default.py:S/2 --workdir=runs/s2        # another size
    vdit train --config=configs/default.py --config.train.steps=50 --workdir=runs/quick

The argument after ':' picks the model variant "NAME/p" (p = spatial patch): mu (tests), Ti, S, B, L,
XL (DiT paper sizes). Every field below can be overridden with --config.FIELD=VALUE.
"""

import ml_collections

from vdit.configlib import default_rules

DEFAULT_VARIANT = "Ti/4"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init, timesteps and noise; the data has its own seed

    # --- Autoencoder: what a "latent" is. Identity = pixels in [-1, 1].
    c.autoencoder = ml_collections.ConfigDict()
    # "identity" (pixel space) | "latent" (VAE latents written by `vdit encode`, read with
    # data.source="latents"; see configs/latent.py)
    c.autoencoder.kind = "identity"
    c.autoencoder.compression = (1, 1, 1)  # (time, height, width) downsampling of the autoencoder
    c.autoencoder.channels = 3  # latent channels
    c.autoencoder.vae = ""  # "latent": the VAE work directory whose decoder renders samples
    c.autoencoder.vae_step = -1  # its checkpoint step (-1: the latest); must be the encoding one

    # --- Model (VideoDiT). The variant fills width/depth/heads; override any of them after.
    c.model = ml_collections.ConfigDict()
    c.model.variant = (
        arg or DEFAULT_VARIANT
    )  # "NAME/p": NAME in vdit.configlib.MODEL_SIZES, p patch
    c.model.width = 0  # D; 0 = from the variant
    c.model.depth = 0  # blocks; 0 = from the variant
    c.model.heads = 0  # attention heads; 0 = from the variant
    c.model.mlp_ratio = 4.0  # MLP hidden = mlp_ratio * width
    c.model.patch_t = 1  # temporal patch pt (the spatial patch is the variant's p)
    c.model.qk_norm = True  # RMSNorm on queries and keys
    c.model.rope_theta = 10_000.0  # 3D RoPE base
    # "auto" (splash on TPU, gpu on GPU, chunked elsewhere) | "chunked" (block-skipping, O(L)
    # memory) | "splash" (Pallas TPU kernel; interpreted, slowly, off TPU) | "gpu" (Pallas Triton
    # flash kernel, block-skipping; interpreted, slowly, off GPU) | "xla" (dense reference)
    c.model.attn_impl = "auto"
    # query/key block of "chunked" (smaller skips more across segments), "splash" (rounded up to
    # a multiple of 128) and "gpu" (rounded up to a power of two)
    c.model.attn_block = 128
    c.model.remat = "none"  # "none" | "full" | "save_dots" | "save_dots_no_batch"
    c.model.scan_layers = True  # scan over stacked blocks (compile time independent of depth)
    c.model.dtype = "float32"  # compute dtype ("bfloat16" on accelerators)
    c.model.param_dtype = "float32"  # parameter and optimizer-state dtype
    # adaLN modulation: 0 computes it per token, a (rows, row_len, 6, width) tensor; N > 0 computes
    # it per distinct timestep of a row (a row holds at most 2 x max_samples_per_row + 1: each
    # sample's time and 0 for conditioning and padding) and gathers it per token inside the adaLN,
    # which saves that tensor's memory at long rows (a row with more than N gives NaN, so is skipped)
    c.model.modulation_slots = 0
    # absolute position beside RoPE: "none" (RoPE only, as Wan2.1) | "fractional" (each token's
    # place within its own sample, t, h, w as fractions in (0, 1), NaViT-style; tried for the
    # default run's motion, no gain measured: BUILD.md, "The default run")
    c.model.pos_embed = "none"
    # each sample's mean-pooled text added to its timestep embedding, so every block's adaLN
    # modulation sees the whole caption (SD3 / Flux's pooled text); needs modulation_slots=0
    c.model.text_pool = False
    c.model.text = ml_collections.ConfigDict()
    c.model.text.kind = "bytes"  # "bytes" (built-in byte-level encoder) | "precomputed" embeddings
    c.model.text.max_len = 48  # caption tokens per sample (BOS + UTF-8 bytes), longer ones are cut
    c.model.text.width = 128  # text encoder width (or precomputed embedding size)
    c.model.text.depth = 2  # text encoder blocks
    c.model.text.heads = 4  # text encoder heads

    # --- Data: captioned videos at native sizes, packed. Procedural by default (see BUILD.md,
    # "Real data", for prepared videos and TFDS datasets).
    c.data = ml_collections.ConfigDict()
    # "synthetic" (procedural, data.synthetic) | "records" (shards written by `vdit prepare`,
    # data.records) | "tfds" (a locally prepared TensorFlow Datasets dataset, data.tfds) |
    # "latents" (VAE latents written by `vdit encode`, data.latents; autoencoder.kind="latent")
    c.data.source = "synthetic"
    c.data.seed = 0  # shuffling, caption dropout, task draws, packing
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.num_samples = 1_000_000  # index space of the procedural source
    c.data.synthetic.frame_choices = (4, 8)  # video durations in frames
    c.data.synthetic.image_fraction = (
        0.3  # share of one-frame samples (images): the image/video mix
    )
    c.data.synthetic.fps = 8.0  # nominal frame rate of the procedural videos (see data.max_fps)
    c.data.synthetic.size_choices = ((16, 16), (16, 32), (32, 16), (24, 32), (32, 24), (32, 32))
    c.data.records = ml_collections.ConfigDict()
    c.data.records.path = ""  # a folder of shards written by `vdit prepare`, or a glob of shards
    c.data.tfds = ml_collections.ConfigDict()  # read with tfds.data_source(download=False)
    c.data.tfds.name = ""  # dataset name (e.g. "ucf101" or "ucf101/ucf101_1_256:2.0.0")
    c.data.tfds.split = "train"  # split, with TFDS slicing ("train[:90%]")
    c.data.tfds.data_dir = ""  # where it was prepared in ArrayRecord format ("" = TFDS default)
    c.data.tfds.video_key = "video"  # feature with the frames (T, H, W, C) or an image (H, W, C)
    c.data.tfds.caption_key = ""  # Text or ClassLabel feature used as caption ("" = none)
    c.data.tfds.fps = 0.0  # nominal frame rate of the dataset for data.max_fps (0 = unknown)
    c.data.latents = ml_collections.ConfigDict()
    c.data.latents.path = ""  # a folder written by `vdit encode`
    c.data.latents.sample_posterior = (
        True  # z ~ N(mean, exp(logvar)) at every use (False: the mean)
    )
    c.data.batch_rows = 2  # global rows per step
    c.data.row_len = 1024  # L: tokens per row
    c.data.text_len = 384  # C: text tokens per row
    c.data.max_samples_per_row = 16  # S
    c.data.packing_bins = 16  # rows packed together (higher fill, more host memory)
    c.data.max_tokens_per_sample = 1024  # larger samples are resized down (never cropped)
    c.data.time_fit = "resample"  # frames short of a whole temporal patch: "resample" picks the
    # kept frames evenly over the clip (nothing cut off); "trim" drops the last ones
    c.data.frame_stride = 1  # keep every k-th source frame (frame-rate subsampling)
    c.data.max_fps = 0.0  # > 0: sources with a higher "fps" are strided down to at most this
    # A sample over the cap keeps its short side at >= min_side pixels (or its own, if smaller) by
    # keeping only its first frames, rather than shrinking in space (a 1000x256x256 clip: 4 frames
    # of 64x64 at the default cap and patch, not 1000 frames of 4x4); 0: space first, then time
    c.data.min_side = 64
    # NaViT token dropping: a share of each sample's generated tokens leaves the row before packing
    # (kept tokens keep their positions; conditioning tokens are never dropped; never at sampling).
    c.data.token_drop = ml_collections.ConfigDict()
    c.data.token_drop.kind = "none"  # "none" | "constant" | "beta" | "size"
    c.data.token_drop.rate = 0.0  # the rate ("constant"), or its cap ("beta", "size"); in [0, 1)
    c.data.token_drop.beta_a = 1.0  # "beta": rate ~ Beta(beta_a, beta_b), capped at rate
    c.data.token_drop.beta_b = 1.0
    c.data.token_drop.ref_tokens = 256  # "size": rate * (1 - ref_tokens / n), 0 for n <= ref_tokens
    c.data.caption_dropout = 0.1  # empty caption rate (classifier-free guidance)
    # Conditioning-task weights (see vdit/data/tasks.py), drawn per video; images are always t2v.
    # The mix trains a model that also animates images, extends videos both ways, loops and
    # connects two clips (`vdit sample` modes); t2v keeps half of the videos.
    c.data.tasks = ml_collections.ConfigDict()
    c.data.tasks.t2v = 0.5
    c.data.tasks.i2v = 0.15  # the first frame given
    c.data.tasks.extend_forward = 0.1  # the first k frames given
    c.data.tasks.extend_backward = 0.1  # the last k frames given
    c.data.tasks.loop = 0.05  # the first and the last frame given
    c.data.tasks.interpolate = 0.1  # the first k1 and the last k2 frames given (connect)
    c.data.workers = 0  # grain worker processes (0 = in the training process)
    # more rejected samples in a row (each is logged with its reason) stop training with an error
    # giving the counts by reason: a source none of whose samples fits the config
    c.data.max_consecutive_rejections = 1000
    # samples held out for `eval_loss`, disjoint from training: the procedural source holds out the
    # indices just past data.synthetic.num_samples (its training data is unchanged); records,
    # latents and tfds hold out this many evenly spaced samples (at most 1 in 10) and train on the
    # rest (0: no eval)
    c.data.eval_samples = 64

    # --- Rectified flow.
    c.flow = ml_collections.ConfigDict()
    c.flow.logit_mean = 0.0  # logit-normal timestep location
    c.flow.logit_std = 1.0  # logit-normal timestep scale
    c.flow.shift_ref_tokens = 256  # a sample of this many tokens gets shift_at_ref
    # timestep shift at the reference size (grows with sqrt(tokens)): 3 puts half the draws of an
    # 8x32x32 clip at t > 0.8 (1: 15%), where a sample's object is placed; there the model's
    # x0-hat keeps one object instead of scattered patches (BUILD.md, "The default run")
    c.flow.shift_at_ref = 3.0
    c.flow.shift_max = 4.0  # cap on the shift

    # --- Optimizer (AdamW, linear warmup then cosine decay, global-norm clipping) and EMA.
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3  # peak learning rate
    c.optim.warmup_steps = 50  # linear warmup
    c.optim.min_lr_ratio = 0.1  # final lr = min_lr_ratio * lr (cosine)
    c.optim.weight_decay = (
        0.01  # decoupled, on weight matrices only (not biases, norms, modulation)
    )
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.grad_clip = 1.0  # global-norm clip
    c.optim.ema_decay = 0.99  # EMA of parameters, used for sampling

    # --- Training loop.
    c.train = ml_collections.ConfigDict()
    c.train.steps = 500  # optimizer steps (about 10 minutes on 2 CPU cores)
    c.train.log_every = 20  # metrics to metrics.jsonl / TensorBoard
    c.train.checkpoint_every = (
        250  # orbax checkpoint interval (steps); the last step is always saved
    )
    c.train.keep_checkpoints = 2  # checkpoints kept
    # "" = a fresh model; else a `vdit export` directory (--format=orbax or safetensors) whose
    # parameters a new run starts from (optimizer fresh, step 0, any mesh); a run that has its own
    # checkpoints resumes from them instead
    c.train.init_from = ""
    c.train.sample_every = 0  # sample grid interval (0: only at the end)
    c.train.eval_every = 0  # `eval_loss` interval (steps; 0: only at the end)
    # `eval_loss` is the held-out velocity MSE of the training parameters averaged over these fixed
    # timesteps (no shift), each also logged as eval_loss_t{t}
    c.train.eval_timesteps = (0.1, 0.3, 0.5, 0.7, 0.9)
    c.train.eval_seed = 0  # the eval noise (per timestep and held-out row; not the training seed)
    c.train.progress = True  # progress bar
    # peak FLOP/s of one device for the logged `mfu`; 0 = look up jax's device kind in
    # vdit.parallel.topology.CHIPS (TPU v4/v5e/v5p/v6e, bf16 peak); an unknown kind (e.g. CPU)
    # logs no `mfu`
    c.train.peak_flops_per_device = 0.0

    # --- Sampling (Euler ODE with classifier-free guidance).
    c.sample = ml_collections.ConfigDict()
    c.sample.steps = 25  # Euler steps
    c.sample.cfg_scale = 3.0  # guidance scale (1 = no guidance)
    c.sample.use_ema = True  # sample with the EMA parameters
    c.sample.fps = 8  # frame rate of written videos
    c.sample.grid_prompts = (  # the fixed-seed grid written to WORKDIR/samples/
        "a red square moves right",
        "a blue circle moves up",
        "a green square moves left",
        "a yellow circle moves down",
    )
    c.sample.grid_shape = (8, 32, 32)  # (frames, height, width) of the grid samples

    # --- Parallelism: mesh axis sizes (-1 fills with the remaining devices) and the rules table.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.sequence = 1
    c.mesh.dcn_data = 1  # slices joined by the data-center network; `data` spans them (outermost)
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = default_rules()  # logical axis -> mesh axes
    return c
