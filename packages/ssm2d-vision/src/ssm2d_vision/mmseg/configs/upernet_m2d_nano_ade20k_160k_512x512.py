# UperNet + M2D-N on ADE20K: Mamba2D's released setting (see _base_/upernet_m2d_ade20k_160k_512x512.py),
# drop path 0.175.
_base_ = ['./_base_/upernet_m2d_ade20k_160k_512x512.py']
model = dict(
    backbone=dict(model_name='m2d_nano', drop_path_rate=0.175),
    decode_head=dict(in_channels=[32, 64, 160, 256]),
    auxiliary_head=dict(in_channels=160))
