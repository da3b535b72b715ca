"""The kernel feature maps phi of linear attention. All are non-negative (paper 4.4)."""

from keras import ops

FEATURE_MAPS = {
    "elu_plus_one": lambda x: ops.elu(x) + 1.0,
    "softplus": ops.softplus,
    "relu": ops.relu,
}


def apply_feature_map(name, x):
    return FEATURE_MAPS[name](x)
