# UperNet + M2D-S on ADE20K: Mamba2D's released setting (see _base_/upernet_m2d_ade20k_160k_512x512.py),
# drop path 0.2.
_base_ = ['./_base_/upernet_m2d_ade20k_160k_512x512.py']
model = dict(
    backbone=dict(model_name='m2d_small', drop_path_rate=0.2),
    decode_head=dict(in_channels=[96, 192, 384, 576]),
    auxiliary_head=dict(in_channels=384))
