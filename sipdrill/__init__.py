"""sipdrill: site-resiliency drills on SIP Front End pools, with real SIP and real DNS."""

__version__ = "0.1.0"
