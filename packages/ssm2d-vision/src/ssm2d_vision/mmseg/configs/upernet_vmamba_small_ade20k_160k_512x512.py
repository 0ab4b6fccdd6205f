# UperNet + VMamba-S on ADE20K (VMamba's released setting: AdamW lr 6e-5, weight decay 0.01, no decay on
# norms, 1500 warm-up iterations then linear decay, drop path 0.3; 16 images per step).
_base_ = ['./_base_/upernet_ade20k_160k_512x512.py']
model = dict(
    backbone=dict(model_name='vmamba_small', drop_path_rate=0.3),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
train_dataloader = dict(batch_size=4)  # per GPU: 4 GPUs x 4 = 16
