"""What tests run besides themselves: the one torchrun launcher (``launch.py``), the scripts it starts
as ranks (``*_helper.py``, probes, the collective guard) and the measuring tools they share."""
