"""Pieces every benchmark shares: the four backends behind one interface (:mod:`.backends`)
and the flow builders (:mod:`.tabular`, :mod:`.image_flows`)."""
