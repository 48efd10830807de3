"""Runtime: where rows live and how passes over them run (distributed ranks, the
workspace, chunked row passes, memory maps, atomic files, prefetch, phase reports).
Imports nothing above `semclust.ops`."""
