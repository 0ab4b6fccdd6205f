# Mamba2D's released ADE20K setting on top of the shared UperNet schedule: AdamW lr 6e-5, weight
# decay 0.05 except on one-dimensional parameters, biases, norms and shortcut scales, gradient
# clipping at norm 1, 1500 warm-up iterations then linear decay; 16 images per step as 8 x 2
# accumulated on one GPU. The per-model configs set the backbone, its drop path and channels.
_base_ = ['./upernet_ade20k_160k_512x512.py']
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        flat_decay_mult=0.,
        bias_decay_mult=0.,
        norm_decay_mult=0.,
        custom_keys={'norm': dict(decay_mult=0.), 'scale': dict(decay_mult=0.)}),
    clip_grad=dict(max_norm=1.0, norm_type=2),
    accumulative_counts=2)
train_dataloader = dict(batch_size=8)  # per GPU, with 2 accumulated steps: 16 on one GPU
