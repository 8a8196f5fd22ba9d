"""How the detector chooses a picture's regions: one frozen object, checked when it is made.

    settings = RegionSettings()                          # the caffe policy, 36 regions: VSRN's and LXMERT's input
    settings = RegionSettings(boxes=None, min_boxes=10)  # generate_tsv.py's variable count (10 to 100)
    settings.record()                                    # what a library, the region cache and a TSV's resume keep

Every job that extracts regions (extract_regions.py, the one-step jobs' region cache, the photo
library, make_dataset.py) holds one of these; the detector's policies read their values from it.
"""

import math
import numbers
from dataclasses import dataclass, field, fields

from utils.errors import OptionError

# Bump when a change makes the same settings give other regions: rows the region cache holds and
# photo libraries made before are then not mixed with the new ones.
REGIONS_VERSION = 2
FIXED_BOXES = 36  # regions per picture: VSRN's and LXMERT's obj36 input
CAFFE_BOXES = (10, 100)  # generate_tsv.py's variable count: MIN_BOXES, MAX_BOXES
POLICY_NAMES = ("caffe", "hf")  # detection.policies' two policies
# The fields a record keeps only when they are not their defaults (a range of boxes, the confidence rule):
# records of fixed counts stay as photo libraries have always written them.
OPTIONAL_FIELDS = ("min_boxes", "max_boxes", "conf_thresh")


@dataclass(frozen=True)
class RegionSettings:
    """The policy ('caffe': bottom-up-attention's generate_tsv.py; 'hf': the LXMERT demo's pipeline), how many
    regions it keeps, and its input sizes.

    boxes: exactly this many regions per picture; None for a variable count: min_boxes..max_boxes under the
    caffe policy (None: CAFFE_BOXES, 10 and 100), the config's range under hf. conf_thresh: the caffe policy's
    confidence rule. min_size, max_size (the network input's shortest and longest side) and proposals (RPN
    proposals kept): None for the policy's own. `version` is the implementation's, not a choice.
    """

    policy: str = "caffe"
    boxes: int | None = FIXED_BOXES
    min_boxes: int | None = None
    max_boxes: int | None = None
    conf_thresh: float = 0.2
    min_size: int | None = None
    max_size: int | None = None
    proposals: int | None = None
    version: int = field(default=REGIONS_VERSION, init=False)

    def __post_init__(self):
        if self.policy not in POLICY_NAMES:
            raise OptionError.naming(
                "{policy} {value!r}: expected one of {names}", value=self.policy, names=", ".join(POLICY_NAMES)
            )
        for name in ("boxes", "min_boxes", "max_boxes", "min_size", "max_size", "proposals"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise OptionError.naming(f"{{{name}}} {{value}}: expected at least 1", value=value)
            object.__setattr__(self, name, int(value))  # numpy's integers too, as JSON records them
        ranged = self.min_boxes is not None or self.max_boxes is not None
        if ranged and self.boxes is not None:
            raise OptionError.naming(
                "{boxes} N takes exactly N regions per picture; {min_boxes}/{max_boxes} take a variable number: "
                "give one or the other"
            )
        if ranged and self.policy != "caffe":
            raise OptionError.naming(
                "{min_boxes}/{max_boxes} select with the caffe policy; {policy} hf takes {boxes} N"
            )
        low, high = self.box_range(None) or (None, None)
        if self.boxes is None and low is not None and low > high:
            raise OptionError.naming(
                "{min_boxes} {low} {max_boxes} {high}: expected 1 <= min <= max", low=low, high=high
            )
        if not (isinstance(self.conf_thresh, (int, float)) and math.isfinite(self.conf_thresh)):
            raise OptionError.naming("{conf_thresh} {value}: expected a number", value=self.conf_thresh)

    def box_range(self, policy_range):
        """(fewest, most) regions per picture: (boxes, boxes) for an exact count; for a variable one, the
        caffe policy's min_boxes..max_boxes (10..100 where not given), else `policy_range` (the hf config's)."""
        if self.boxes is not None:
            return self.boxes, self.boxes
        if self.policy == "caffe":
            return self.min_boxes or CAFFE_BOXES[0], self.max_boxes or CAFFE_BOXES[1]
        return policy_range

    def record(self):
        """The settings as JSON-ready values: what a photo library records, and the region cache's key."""
        record = {name: getattr(self, name) for name in ("policy", "boxes", "min_size", "max_size", "proposals")}
        defaults = RegionSettings()
        for name in OPTIONAL_FIELDS:
            if getattr(self, name) != getattr(defaults, name):
                record[name] = getattr(self, name)
        record["regions_version"] = self.version
        return record

    @classmethod
    def from_record(cls, record):
        """The settings of a record (`record()`'s; other keys, such as a library's detector config, ignored)."""
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{key: value for key, value in record.items() if key in names})
