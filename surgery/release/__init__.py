"""Releasing an output folder: its model card and its push to the Hugging Face Hub.

* :mod:`.card` -- ``write_card(folder)``: ``README.md`` built from ``surgery.json``
  alone (metadata via ``huggingface_hub.ModelCardData``, a plain-words body with
  the before/after table, the evaluation's limits, how to verify and reproduce,
  the base model's own card kept below).  The card is then hashed into the
  manifest's ``outputs`` so ``surgery verify`` keeps passing.
* :mod:`.hub` -- ``push(folder, repo_id)``: ``verify`` first (a folder that does
  not match its manifest is never pushed), then ``HfApi.create_repo`` and
  ``HfApi.upload_folder`` with a commit message naming the method and the
  manifest's sha256.  The token is whatever huggingface_hub finds (``HF_TOKEN``
  or the login); this package never reads it into a message, log or file.
"""
from .card import CardResult, build_card, write_card
from .hub import PushResult, push

__all__ = ["CardResult", "PushResult", "build_card", "push", "write_card"]
