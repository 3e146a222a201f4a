"""Speculative decoding: token trees (SpecInfer) and their exact verification."""
from spruce.spec.tree import (DraftStepFn, Proposal, TokenTree, build_by_beam, build_by_expansion,
                              build_by_expansion_batch, merge_trees)
from spruce.spec.verify import (VerifyResult, max_verify_steps, spec_sampling_metadata,
                                target_probs, verify_greedy, verify_stochastic,
                                verify_stochastic_batch)

__all__ = ["DraftStepFn", "Proposal", "TokenTree", "build_by_beam", "build_by_expansion",
           "build_by_expansion_batch", "merge_trees", "VerifyResult", "max_verify_steps",
           "spec_sampling_metadata", "target_probs", "verify_greedy", "verify_stochastic",
           "verify_stochastic_batch"]
