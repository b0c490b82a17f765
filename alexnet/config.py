"""Typed configuration of the two-column network (the model's own section of a job config)."""

from __future__ import annotations

from dataclasses import dataclass

LRN_CONVENTIONS = ("paper", "per_size")
VARIANTS = ("paper", "small")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and constants of the two-column AlexNet.

    The defaults are the 2012 paper's network at 1000 classes. Channel and unit
    counts are **per column**; the network always has two columns (the paper's two
    GPUs), whether they run in one process or on two ranks.

    Input size: the paper says 224, but conv1 (11x11, stride 4) only yields the
    paper's 55x55 maps from 227 pixels ((227 - 11) / 4 + 1 = 55). The original
    cuda-convnet code got there by padding the 224 crop; we take 227x227 crops
    with no padding (as Caffe's reference model does), which gives the same 55x55x48
    maps per column and the same 60,965,224 parameters.

    LRN convention: ``"paper"`` (default) uses the formula as printed,
    b = a / (k + alpha * sum a^2)^beta, because this project reproduces the paper
    to its printed constants. ``"per_size"`` divides alpha by n, as cuda-convnet
    and ``torch.nn.LocalResponseNorm`` do; choose it to match those exactly.
    """

    num_classes: int = 1000
    input_size: int = 227
    in_channels: int = 3
    conv_channels: tuple[int, int, int, int, int] = (48, 128, 192, 192, 128)
    fc_units: int = 2048
    conv1_kernel: int = 11
    conv1_stride: int = 4
    conv1_padding: int = 0
    conv2_kernel: int = 5
    lrn_size: int = 5
    lrn_k: float = 2.0
    lrn_alpha: float = 1e-4
    lrn_beta: float = 0.75
    lrn_convention: str = "paper"
    dropout: float = 0.5
    init_std: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"model.num_classes={self.num_classes}: need at least 2 classes")
        if self.lrn_convention not in LRN_CONVENTIONS:
            raise ValueError(f"model.lrn_convention={self.lrn_convention!r}: use one of {LRN_CONVENTIONS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout}: must be in [0, 1)")
        if len(self.conv_channels) != 5 or min(self.conv_channels) < 1:
            raise ValueError(f"model.conv_channels={self.conv_channels}: give 5 positive per-column widths")
        if self.fc_units < 1:
            raise ValueError(f"model.fc_units={self.fc_units}: must be positive")
        if self.spatial_sizes()[-1] < 1:
            raise ValueError(
                f"model.input_size={self.input_size} is too small for conv1 "
                f"(kernel {self.conv1_kernel}, stride {self.conv1_stride}) and three 3/2 pools; "
                "use ModelConfig.small() for 32-64 px images"
            )

    @classmethod
    def small(cls, num_classes: int = 10, input_size: int = 32, **overrides) -> ModelConfig:
        """The small-image variant: same eight blocks and exchange points, narrower.

        For 32-64 px inputs (CIFAR- or MNIST-sized). conv1 becomes 5x5 with stride
        ``input_size // 32`` so that the three 3/2 max-pools leave 3x3 maps before fc6.
        Initialisation is scaled to the fan-in (He), because N(0, 0.01) on a narrow
        net starves the gradient for hundreds of steps; the paper network keeps 0.01.
        """
        if input_size < 32:
            raise ValueError(f"model.input_size={input_size}: the small variant needs >= 32 px")
        params = dict(
            num_classes=num_classes,
            input_size=input_size,
            conv_channels=(16, 32, 48, 48, 32),
            fc_units=256,
            conv1_kernel=5,
            conv1_stride=max(1, input_size // 32),
            conv1_padding=2,
            conv2_kernel=5,
            init_std=0.0,  # 0 means: He initialisation (std = sqrt(2 / fan_in))
        )
        params.update(overrides)
        return cls(**params)

    @classmethod
    def for_variant(
        cls, variant: str, num_classes: int | None = None, input_size: int | None = None, **overrides
    ) -> ModelConfig:
        """The config of a named variant (``VARIANTS``); ``None`` sizes take the variant's defaults
        (paper: 1000 classes at 227 px; small: 10 classes at 32 px)."""
        if variant not in VARIANTS:
            raise ValueError(f"model.variant={variant!r}: use one of {VARIANTS}")
        sizes = {k: v for k, v in (("num_classes", num_classes), ("input_size", input_size)) if v is not None}
        if variant == "small":
            return cls.small(**sizes, **overrides)
        return cls(**sizes, **overrides)

    @property
    def fc8_split(self) -> tuple[int, int]:
        """Logits computed by column 0 and column 1 (column 0 takes the odd one)."""
        half = (self.num_classes + 1) // 2
        return half, self.num_classes - half

    def spatial_sizes(self) -> tuple[int, int, int, int]:
        """Side of the maps after conv1, pool1, pool2 and pool5 (55, 27, 13, 6 for the paper)."""
        s1 = (self.input_size + 2 * self.conv1_padding - self.conv1_kernel) // self.conv1_stride + 1
        p1 = (s1 - 3) // 2 + 1
        p2 = (p1 - 3) // 2 + 1  # conv2 keeps the size (padding kernel // 2)
        p5 = (p2 - 3) // 2 + 1  # conv3-5 keep the size (padding 1)
        return s1, p1, p2, p5
