"""Training assembly every task shares: the task module, optimizer and schedule, trainer, callbacks,
checkpoint I/O."""
