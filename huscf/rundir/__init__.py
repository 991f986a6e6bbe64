"""The run directory: its files (``files.RunDir``: config, checkpoints, metrics, samples) and the
typed records written into them and read back (``records``: a round, an evaluation)."""

from huscf.rundir.files import RunDir, check_model_state
from huscf.rundir.records import (EvalRecord, EvalSettings, FinalScore, GeneratorRef, GeneratorScore, RoundRecord,
                                  read_eval, read_rounds)

__all__ = ["EvalRecord", "EvalSettings", "FinalScore", "GeneratorRef", "GeneratorScore", "RoundRecord", "RunDir",
           "check_model_state", "read_eval", "read_rounds"]
