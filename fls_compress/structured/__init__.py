"""Structured pruning (``prune --structure channels|neurons``): structural groups of the ONNX graph
(:mod:`.groups`, :mod:`.walk`), their selection and compensation (:mod:`.selection`), the rewrite with
smaller tensors (:mod:`.rewrite`), the job stage (:mod:`.stage`) and its report sections (:mod:`.report`)."""
