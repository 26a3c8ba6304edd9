"""Blind pairwise user studies (RAIM task 2 style): ``realisr study create | serve | results``.

:mod:`.design` makes a study folder and each rater's sequence, :mod:`.store` keeps votes in SQLite,
:mod:`.server` is the rating web app, :mod:`.analysis` fits Bradley–Terry scores with intervals, and
:mod:`.report` writes CSV and HTML.
"""
