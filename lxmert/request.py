"""What every LXMERT job is asked: which model scores the pairs, how, in what batches, where."""

from dataclasses import dataclass

from lxmert.loading import DEFAULT_MODEL, check_mode
from utils.errors import OptionError


@dataclass(frozen=True, kw_only=True)
class LxmertRequest:
    """model: a local folder of LXMERT's weights, or a hub name; mode: 'matched' (the matching head's
    probability) or 'cosine' (see lxmert.scoring); batch_size: pairs per forward pass; device: None for CUDA
    when available; amp: bfloat16 autocast on CUDA; tokenizer: a folder or name (None: the model's)."""

    model: str = DEFAULT_MODEL
    mode: str = "matched"
    batch_size: int = 64
    device: str | None = None
    amp: bool = False
    tokenizer: str | None = None

    def __post_init__(self):
        check_mode(self.mode)
        if self.batch_size < 1:
            raise OptionError.naming("{batch_size} {value}: must be at least 1", value=self.batch_size)
