"""Sparse autoencoders for SAILS (methods.md §4).

* :mod:`.model`    -- :class:`SAE` in the SAELens layout; :func:`load_sae` (folder or
  Hub id, subfolders), ``SAE.save``, ``SAE.check_against``.
* :mod:`.collect`  -- :func:`collect_activations` (residual-stream inputs of decoder
  layers, scoped hooks) and the training corpus.
* :mod:`.train`    -- :func:`train_sae` (TopK + AuxK, unit decoder rows), metrics,
  and :func:`train_model_saes`, the ``surgery sae train`` flow.
* :mod:`.subspace` -- :func:`safety_subspace`: the interpretable safety subspace U.
"""
from .collect import Corpus, build_corpus, collect_activations
from .model import SAE, SAEError, hook_name_for_layer, layer_of_hook, load_sae, random_sae
from .subspace import SafetySubspace, feature_means, safety_subspace
from .train import evaluate_sae, train_model_saes, train_sae

__all__ = ["SAE", "SAEError", "load_sae", "random_sae", "hook_name_for_layer", "layer_of_hook",
           "collect_activations", "build_corpus", "Corpus", "train_sae", "evaluate_sae", "train_model_saes",
           "SafetySubspace", "safety_subspace", "feature_means"]
