"""Lightning glue: the LightningModule, data modules, callbacks, checkpoint I/O, loggers and run directories."""
