"""Pieces every benchmark shares: the four backends behind one interface (:mod:`.backends`),
the flow builders (:mod:`.tabular`, :mod:`.image_flows`) and what each run records about
itself, its machine and its model (:mod:`.records`)."""
