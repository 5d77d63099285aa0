"""Prometheus metrics: counts kept where requests are served
(L{registry}), turned into metric families when Prometheus scrapes
(L{collector}), served on a ``type: metrics`` listener (L{resource}), and,
with ``processes: N``, gathered from every process into one answer
(L{aggregate})."""
