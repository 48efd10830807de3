"""The method: semantic space and text counterparts, neighbour lists, heads, the stateful
parts of the stage-1 loss, stage-1 training and stage-2 self-enhancement. Imports
`semclust.ops`, `semclust.runtime`, `semclust.config` and, of `semclust.inputs`, only the
source contract."""
