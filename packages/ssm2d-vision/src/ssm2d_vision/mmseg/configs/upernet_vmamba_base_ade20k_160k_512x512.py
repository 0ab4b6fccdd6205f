# UperNet + VMamba-B on ADE20K (VMamba's released setting: AdamW lr 6e-5, weight decay 0.01, no decay on
# norms, 1500 warm-up iterations then linear decay, drop path 0.6; 16 images per step).
_base_ = ['./_base_/upernet_ade20k_160k_512x512.py']
model = dict(
    backbone=dict(model_name='vmamba_base', drop_path_rate=0.6),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
train_dataloader = dict(batch_size=4)  # per GPU: 4 GPUs x 4 = 16
