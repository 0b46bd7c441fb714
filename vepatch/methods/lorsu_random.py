"""The localization control: LoRSU's budget (same fc1 share, same heads per layer) at random
places (Hase et al. 2023: editing at random places can work nearly as well)."""

from . import lorsu
from .method import Method

METHOD = Method("lorsu-random", "LoRSU's budget at random places (the localization control)", lorsu.build, masks="random")
