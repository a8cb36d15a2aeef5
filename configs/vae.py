"""The causal 3D VAE (video compression network), trained on procedural videos and images on CPU
(or camera pans across photos, or prepared real videos: data.source).

    vdit train --config=configs/vae.py --workdir=runs/vae
    vdit train --config=configs/vae.py --config.train.steps=50 --workdir=runs/vae-quick

`kind = "vae"` makes `vdit train` train the VAE task (vdit/train/vae_task.py) in the one training loop. Every field below can be
overridden with --config.FIELD=VALUE. The defaults are a small network that trains in minutes on two
CPU cores; the architecture is the usual 4x8x8 compression to 16 channels, so larger widths
(`vae.base_channels=128`, `vae.blocks_per_level=2`) are a config change.
"""

import ml_collections

from vdit.configlib import default_rules


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.kind = "vae"  # which network `vdit train` trains: "vae" here ("dit" = configs/default.py)
    c.seed = 0  # parameter init and posterior noise; the data has its own seed

    # --- Network (vdit.models.vae.VAEConfig).
    c.vae = ml_collections.ConfigDict()
    c.vae.latent_channels = 16  # Z: channels of the latent
    c.vae.base_channels = 16  # channels of the first level (64-128 for real data)
    c.vae.channel_mults = (1, 2, 4, 4)  # channels per level = base * mult; len - 1 spatial x2 downs
    c.vae.blocks_per_level = 1  # ResNet blocks per encoder level (decoder: one more)
    c.vae.temporal_down = (False, True, True)  # which downsamplings also halve time (ct = 2**count)
    c.vae.norm = "rms"  # "rms" (per pixel, tiles blend near-exactly) | "group" (per frame)
    c.vae.groups = 8  # GroupNorm groups (norm="group")
    c.vae.mid_attention = False  # per-frame spatial self-attention in the mid blocks
    c.vae.temporal_kernel = 3  # kt of the causal convolutions (>= 2)
    c.vae.pad_mode = "replicate"  # past-side padding before the first frame: "replicate" | "zeros"
    c.vae.dtype = "float32"  # compute dtype ("bfloat16" on accelerators)
    c.vae.param_dtype = "float32"  # parameter and optimizer-state dtype

    # --- Loss: l1 * |x - x'| + l2 * (x - x')^2 + kl * KL, each a mean over elements.
    c.loss = ml_collections.ConfigDict()
    c.loss.l1_weight = 1.0  # reconstruction L1 (pixels in [-1, 1])
    c.loss.l2_weight = 0.0  # reconstruction L2
    c.loss.kl_weight = 1e-4  # KL(posterior || N(0, 1)) per latent element
    c.loss.sample_posterior = True  # decode a posterior sample (False: the mean, an autoencoder)
    # Adversarial term (off at 0, the default: no discriminator exists then, in the state or the
    # checkpoint). > 0: from step disc_start on, the loss adds disc_weight * -mean D(recon) and the
    # discriminator trains with a hinge loss.
    c.loss.disc_weight = 0.0
    c.loss.disc_start = 100  # step from which the adversarial term applies and D trains
    # True: disc_weight is also scaled by LDM's adaptive weight |grad rec| / (|grad adv| + 1e-4)
    # (gradient norms at the decoder's last convolution kernel, clipped to [0, 1e4])
    c.loss.disc_adaptive = False

    # --- Patch discriminator (vdit/models/discriminator.py), used when loss.disc_weight > 0:
    # disc.layers 3x3 stride-2 convolutions (LeakyReLU) of disc.channels * 2**i channels, then one
    # logit per patch. Its parameters and Adam state are part of the train state (checkpointed,
    # sharded by the same rules as the VAE's convolutions).
    c.disc = ml_collections.ConfigDict()
    c.disc.channels = 32  # channels of the first convolution (doubling per layer, capped at 8x)
    c.disc.layers = 3  # stride-2 convolutions: one logit per 2**layers x 2**layers patch
    c.disc.temporal_kernel = 1  # 1: each frame judged alone (2D); > 1: causal 3D convolutions
    c.disc.lr = 1e-4  # constant learning rate of the discriminator's Adam
    c.disc.b1 = 0.5
    c.disc.b2 = 0.9
    c.disc.grad_clip = 1.0  # global-norm clip of the discriminator's gradients

    # --- Data: videos and images at native sizes, one shape per step (vdit/data/vae_data.py).
    c.data = ml_collections.ConfigDict()
    c.data.seed = 0  # training stream; batch k is a function of (seed, k), so resume is exact
    # "synthetic" (procedural) | "pan" (camera pans across the scikit-image sample photos of
    # vdit.data.pan.TRAIN; needs scikit-image) | "mixed" (each sample a pan with probability
    # pan_fraction, else procedural) | "records" (real videos: shards written by `vdit prepare`)
    c.data.source = "synthetic"
    c.data.pan_fraction = 0.5  # "mixed": share of pan samples
    c.data.records = ml_collections.ConfigDict()
    # "records": a folder of *.array_record shards or a glob. Per sample: a random window of the
    # step's duration, the largest crop of the step's aspect ratio (random position) area-resized
    # to the step's size. Records that do not decode, are too short or would need upsampling are
    # skipped (counted as data_skipped in the metrics). The last data.eval_samples records are
    # held out for evaluation (eval_psnr_records / eval_ssim_records) and never trained on.
    c.data.records.path = ""
    c.data.frame_choices = (5, 9, 17)  # video durations; ct=4 keeps 1 + 4k frames (others trimmed)
    c.data.image_fraction = 0.3  # share of steps that train on images (one-frame videos)
    c.data.size_choices = (
        (16, 16),
        (16, 32),
        (32, 16),
        (32, 32),
        (24, 40),
    )  # (H, W), multiples of 8
    c.data.batch_size = 4  # samples per step (all of the step's shape)
    c.data.max_pixels = 4 * 17 * 32 * 32  # cap on batch * frames * H * W: larger shapes take fewer
    c.data.eval_seed = 1_000_003  # held-out stream for PSNR / SSIM and the written videos
    # held-out samples evaluated at every eval (per set: procedural as eval_psnr / eval_ssim; with
    # "pan" / "mixed" also pans across the held-out photos as eval_psnr_pan / eval_ssim_pan)
    c.data.eval_samples = 8

    # --- Optimizer (AdamW, linear warmup then cosine decay, global-norm clipping) and EMA.
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3  # peak learning rate
    c.optim.warmup_steps = 20  # linear warmup
    c.optim.min_lr_ratio = 0.1  # final lr = min_lr_ratio * lr (cosine)
    c.optim.weight_decay = 0.0  # decoupled, on weight matrices only (not biases, norms)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.grad_clip = 1.0  # global-norm clip
    c.optim.ema_decay = 0.99  # EMA of parameters, used for evaluation and latent statistics

    # --- Training loop.
    c.train = ml_collections.ConfigDict()
    c.train.steps = 300  # optimizer steps
    c.train.log_every = 20  # metrics to metrics.jsonl / TensorBoard
    c.train.eval_every = 100  # held-out PSNR / SSIM and a side-by-side video (and at the end)
    c.train.checkpoint_every = 100  # orbax checkpoint interval; the last step is always saved
    c.train.keep_checkpoints = 2  # checkpoints kept
    # "" = a fresh model; else a `vdit export` directory (--format=orbax or safetensors) whose
    # parameters a new run starts from (optimizer fresh, step 0, any mesh); a run that has its own
    # checkpoints resumes from them instead
    c.train.init_from = ""
    c.train.stats_samples = 16  # samples over which the per-channel latent mean/std are computed
    c.train.video_samples = 4  # held-out samples in the side-by-side video (input | reconstruction)
    c.train.fps = 8  # frame rate of written videos
    c.train.progress = True  # progress bar

    # --- Parallelism: mesh axis sizes (-1 fills with the remaining devices) and the rules table.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.sequence = 1
    c.mesh.dcn_data = 1
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = default_rules()  # logical axis -> mesh axes
    return c
