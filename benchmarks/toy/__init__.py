"""Small problems that run in minutes on a laptop: the digits demo (:mod:`.demo`, ``make
demo``) and the linear flow in closed form (:mod:`.linear`, paper Fig. 2 and Theorem 3)."""
