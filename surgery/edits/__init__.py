"""Weight edits, one module per method.  Each method exposes a pure per-tensor
function (what the checkpoint stream calls) and an in-memory context manager
(what sweeps and tuning use); both compute in float32 and store in the input
dtype."""
