# The half-resolution student of retinanet_r18_tiny.py (64 px views of the quickstart data): the pyramid
# shifts down one level, P2-P6 at strides 4-64, so each level has the feature-map size of the 128 px
# teacher's P3-P7 (detkd pairs them by that shift). Same widths and head; only the levels change.
_base_ = './retinanet_r18_tiny.py'
model = dict(
    backbone=dict(out_indices=(0, 1, 2, 3)),  # C2-C5: 16, 32, 64, 128 channels
    neck=dict(in_channels=[16, 32, 64, 128]),  # P2-P6
    bbox_head=dict(
        anchor_generator=dict(strides=[4, 8, 16, 32, 64])))  # 8 px anchors on P2: half-resolution objects are 6-24 px
