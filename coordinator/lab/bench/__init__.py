"""``python -m coordinator bench``: the cold stampede on a warm pod pool, the hot path, the
lease cost (:mod:`.command`), timed by :mod:`.pool` and :mod:`.micro`, reported by
:mod:`.report`."""
