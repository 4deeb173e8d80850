"""Layer helpers that add common convolutional-network blocks to a GraphBuilder.

Each helper takes the parameter prefix that names its initializers:
``{prefix}.conv.weight`` for a convolution (PyTorch layout (C_out, C_in, kH, kW)),
``{prefix}.bn.weight``, ``.bn.bias``, ``.bn.running_mean`` and ``.bn.running_var`` for
a BatchNormalization, and ``{prefix}.weight`` (layout (out, in)) and ``{prefix}.bias``
for a dense layer.
"""

from __future__ import annotations

from ._builder import GraphBuilder, filled, he_normal


def conv2d(
    builder: GraphBuilder,
    x: str,
    prefix: str,
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
) -> str:
    """Add a bias-free square convolution with symmetric zero padding."""
    weight = builder.add_parameter(
        f"{prefix}.conv.weight",
        (out_channels, in_channels, kernel, kernel),
        "weight",
        he_normal(in_channels * kernel * kernel),
    )
    return builder.add_node(
        "Conv",
        [x, weight],
        prefix,
        kernel_shape=[kernel, kernel],
        strides=[stride, stride],
        pads=[padding] * 4,
    )


def batch_norm(
    builder: GraphBuilder, x: str, prefix: str, channels: int, epsilon: float
) -> str:
    """Add an inference-mode BatchNormalization with scale 1, shift 0, mean 0, var 1."""
    name = f"{prefix}.bn"
    shape = (channels,)
    scale = builder.add_parameter(f"{name}.weight", shape, "norm_scale", filled(1.0))
    shift = builder.add_parameter(f"{name}.bias", shape, "norm_shift", filled(0.0))
    mean = builder.add_parameter(
        f"{name}.running_mean", shape, "norm_stat", filled(0.0)
    )
    var = builder.add_parameter(f"{name}.running_var", shape, "norm_stat", filled(1.0))
    return builder.add_node(
        "BatchNormalization",
        [x, scale, shift, mean, var],
        prefix,
        epsilon=epsilon,
        training_mode=0,
    )


def relu(builder: GraphBuilder, x: str, prefix: str) -> str:
    """Add a ReLU."""
    return builder.add_node("Relu", [x], prefix)


def dense(
    builder: GraphBuilder,
    x: str,
    prefix: str,
    in_features: int,
    out_features: int,
    output: str | None = None,
) -> str:
    """Add a Gemm with bias on a (batch, in_features) tensor."""
    weight = builder.add_parameter(
        f"{prefix}.weight",
        (out_features, in_features),
        "weight",
        he_normal(in_features),
    )
    bias = builder.add_parameter(f"{prefix}.bias", (out_features,), "bias", filled(0.0))
    return builder.add_node("Gemm", [x, weight, bias], prefix, output=output, transB=1)


def global_average_pool(builder: GraphBuilder, x: str, prefix: str) -> str:
    """Average over the spatial axes of an NCHW tensor, returning shape (N, C)."""
    pooled = builder.add_node("GlobalAveragePool", [x], prefix)
    return builder.add_node("Flatten", [pooled], prefix, axis=1)
