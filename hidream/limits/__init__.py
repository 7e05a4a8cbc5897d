"""Every range and choice the pack accepts, declared once, and the one way to check them.

The Runware task validator (``hidream.runware.task``), the engine's own checks (sampling,
LoRA, caches, output) and the node widgets (``nodes/``) all read their bounds from here, so
a widget can never offer what the engine refuses, and a task refused by the validator names
the same range the engine would. torch-free: the validator runs before any model work and
must not pay for importing torch.

Every failed check reads ``<field>: got <value>; allowed: <what>`` (``problem``), whoever
raises it: the node, the engine or the Runware validator (which collects them instead).
"""

from __future__ import annotations

from .check import (
    Range,
    as_int,
    check_choice,
    check_int,
    check_number,
    describe_choices,
    is_number,
    problem,
    show,
    suggest,
)
from .schedulers import (
    DEFAULT_SHIFT,
    NAME_TABLE,
    SCHEDULER_NAMES,
    SHIFT,
    SIGMA_SCHEDULES,
    VARIANTS,
    SchedulerInfo,
    check_scheduler_name,
)

# Image and sampling
SIZE = Range(128, 2048, 16)
DEFAULT_SIZE = 1024
STEPS = Range(1, 1000)
DEFAULT_STEPS = 30
SEED = Range(0, 9223372036854775807)
RANDOM_SEED_MAX = 2**32 - 1  # a random seed fits every client's int
CFG = Range(0.0, 100.0)
DEFAULT_CFG = 5.0
BATCH = Range(1, 20)  # images per run; Runware's numberResults
PROMPT_MAX_CHARS = 3000
MAX_SEQUENCE_LENGTH = Range(1, 512)  # T5 / Llama tokens per prompt
VARIANT_CHOICES = ("auto", *VARIANTS)

# LoRA
LORA_WEIGHT = Range(-4.0, 4.0)
LORA_STAGES = ("both", "high", "low")
DEFAULT_LORA_STAGE = "both"
LORA_BOUNDARY = Range(0.001, 0.999)  # a sigma strictly inside (0, 1)
DEFAULT_LORA_BOUNDARY = 0.875
LORA_MERGE_MODES = ("auto", "on", "off")

# Step caches
CACHE_THRESHOLD = Range(0.0, 1.0)  # fbCacheThreshold, teaCacheDistance, dbCacheThreshold
CACHE_MAX_CONSECUTIVE = Range(1, 5)
DEFAULT_CACHE_MAX_CONSECUTIVE = 3
CACHE_REFRESH_INTERVAL = Range(1, 1000)  # dbCacheSkipInterval: a full step at least every n
CACHE_START_STEP = Range(0)
CACHE_END_STEP = Range(1)
CACHE_START_PERCENT = Range(0, 99)
CACHE_END_PERCENT = Range(1, 100)
DBCACHE_FRONT_BLOCKS = Range(1, 64)  # Fn
DBCACHE_BACK_BLOCKS = Range(0, 64)  # Bn

# Output and delivery
OUTPUT_TYPES = ("URL", "dataURI", "base64Data")
OUTPUT_FORMATS = ("JPG", "PNG", "WEBP")
QUALITY = Range(20, 99)
DEFAULT_QUALITY = 95
TTL = Range(60)  # seconds a URL output lives; Runware's floor
DELIVERY_METHODS = ("sync", "async")
SAFETY_MODES = ("none", "fast")
SAFETY_MASK_METHODS = ("blur", "black")
SAFETY_THRESHOLD = Range(0.2, 1.0)  # NudeNet never returns a detection scored under 0.2

__all__ = [
    "DEFAULT_SHIFT",
    "NAME_TABLE",
    "SCHEDULER_NAMES",
    "SHIFT",
    "SIGMA_SCHEDULES",
    "VARIANTS",
    "Range",
    "SchedulerInfo",
    "as_int",
    "check_choice",
    "check_int",
    "check_number",
    "check_scheduler_name",
    "describe_choices",
    "is_number",
    "problem",
    "show",
    "suggest",
]
