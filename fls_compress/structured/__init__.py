"""Structured pruning (``prune --structure channels|neurons|heads``): structural groups of the ONNX graph
(:mod:`.groups`, :mod:`.walk`; attention heads: :mod:`.heads`, :mod:`.heads_walk`, :mod:`.shapes`), their
selection and compensation (:mod:`.selection`), the rewrite with smaller tensors (:mod:`.rewrite`,
:mod:`.heads_rewrite`), the job stages (:mod:`.stage`, :mod:`.heads_stage`) and report sections (:mod:`.report`)."""
