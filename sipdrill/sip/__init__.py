"""SIP for sipdrill.

The protocol core (``message``, ``framing``, ``transaction``, ``keepalive``,
``registrar``, ``digest``, ``srv``) is sans-IO in the style of h11: it takes
bytes and the current time and returns bytes, events and the next deadline.
It never opens a socket, reads a clock or draws from a global RNG, so every
timer schedule can be tested without sleeping. The asyncio transports live
beside it and drive it.

This module imports nothing on purpose: importing ``sipdrill.sip`` must not
pull in asyncio or the transports.
"""
