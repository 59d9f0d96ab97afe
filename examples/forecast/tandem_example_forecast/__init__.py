"""A GRU forecaster on time series from CSV files as a Tandem task (entry point `forecast`)."""

from tandem_example_forecast.task import WINDOW, Forecaster, ForecastTask, Windows

__all__ = ["WINDOW", "ForecastTask", "Forecaster", "Windows"]
__version__ = "1.0.0"
