"""Crosscoders: one dictionary reading several activations at once (layers of one model, or two models on the
same text), and the readouts of model diffing. Any architecture trains as a crosscoder: give `saelab.train` a
JoinedSource and train on its joined hook (SAEConfig.parts records what it reads).

    source = JoinedSource("runs/acts", ["blocks.6.hook_resid_post", "blocks.9.hook_resid_post"])
    [xc] = saelab.train(source, [dict(arch="batchtopk", width=8192, k=64, hook=source.name)])
    report = diffing_report(xc.sae, JoinedSource.for_crosscoder("runs/heldout", xc.sae).in_order([xc.sae.cfg.hook_name]))
"""

from saelab.activations.joined import JoinedSource, joined, joined_name, split
from .paired import paired_activations, paired_hook, unpaired
from .readouts import (DiffingReport, Scaling, classify, decoder_cosine, diffing_report, latent_scaling, part_norms,
                       relative_norm)

__all__ = ["JoinedSource", "joined", "joined_name", "split", "paired_activations", "paired_hook", "unpaired",
           "DiffingReport", "Scaling", "classify", "decoder_cosine", "diffing_report", "latent_scaling", "part_norms",
           "relative_norm"]
