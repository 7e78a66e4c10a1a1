"""Rank-aware logging: rank 0 talks at INFO, other ranks only warn, every line names its rank."""

import logging
import sys
from pathlib import Path

LOGGER_NAME = "sam_finetune"


def setup_logging(rank: int) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    stream.setFormatter(fmt)
    stream.addFilter(lambda record: not getattr(record, "file_only", False))
    logger.addHandler(stream)
    return logger


class RunLogFile(logging.FileHandler):
    """train.log. When it cannot be written (a full disk), the console says so once and the run's
    messages go on there; logging's default is a traceback on stderr for every line."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        self.failed = True
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        logging.getLogger(LOGGER_NAME).warning(f"could not write {self.baseFilename}: {reason}; "
                                               "the log goes on on the console only")


def add_log_file(logger: logging.Logger, log_file: Path) -> None:
    handler = RunLogFile(log_file)
    handler.setFormatter(logger.handlers[0].formatter)
    logger.addHandler(handler)


# log.info(..., extra=FILE_ONLY): into train.log, not onto the console (long tables, file lists).
FILE_ONLY = {"file_only": True}


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
