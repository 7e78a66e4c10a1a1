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


def add_log_file(logger: logging.Logger, log_file: Path) -> None:
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logger.handlers[0].formatter)
    logger.addHandler(handler)


# log.info(..., extra=FILE_ONLY): into train.log, not onto the console (long tables, file lists).
FILE_ONLY = {"file_only": True}


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
