# A small Swin Transformer RetinaNet (MMDetection's SwinTransformer backbone) for detkd's quickstart data:
# the transformer teacher of MTPD's transformer-to-CNN distillation, shrunk to train on CPU
# (embed 32, depths 2-2-2-2, window 4). retinanet_r18_tiny.py with its backbone replaced (_delete_).
_base_ = './retinanet_r18_tiny.py'
model = dict(
    backbone=dict(
        _delete_=True,
        type='SwinTransformer',
        embed_dims=32,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 4, 8],
        window_size=4,
        mlp_ratio=4,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.1,
        patch_norm=True,
        out_indices=(1, 2, 3),  # 64, 128, 256 channels at strides 8, 16, 32
        with_cp=False,
        convert_weights=False,
        init_cfg=None),
    neck=dict(in_channels=[64, 128, 256]))
