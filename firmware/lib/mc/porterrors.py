"""What the MicroPython ESP32 port (1.22 to 1.27) raises from each call the HAL makes, in one table.

Read from the port's source (ports/esp32/modsocket.c, machine_pin.c, network_wlan.c,
extmod/modtls_mbedtls.c, extmod/vfs_lfs.c).  The firmware catches exactly these around
each call, and the fakes (mcfakes, the emulated board) raise them, so a test cannot be
kinder than the board (`mcfakes.PORT_ERROR_EXAMPLES` holds an instance of each, as the
port builds it).  Notable entries:

- TLS handshake: a certificate that fails verification (validity starts in the future
  on a board whose clock still reads 2000-01-01, expired, rotated to another CA,
  hostname mismatch) raises ValueError with mbedtls' verify text, not OSError; a bad
  CA file raises ValueError("invalid cert"); mbedtls out of memory raises
  OSError(ENOMEM); other mbedtls errors OSError(negative code, text).
- socket.getaddrinfo: OSError(-202) (lwIP "name or service not known"; -2 in older
  ports); connect and read/write: OSError(errno), ETIMEDOUT after settimeout().
- Any call that allocates on the MicroPython heap can raise MemoryError.
- machine.Pin / UART / SPI with a pin or bus the chip lacks: ValueError ("invalid pin").
- Flash (LittleFS) writes: OSError(ENOSPC / EIO / ...).
"""

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


ENOMEM = const(12)
ETIMEDOUT = const(116)  # the ESP32 port's (newlib) value
ECONNRESET = const(104)  # how lwIP reports a refused or reset TCP connection
EAI_NONAME = const(-202)

# call -> the exception types it raises on the port
RAISES = {
    "wifi_connect": (OSError,),
    "getaddrinfo": (OSError, MemoryError),
    "connect": (OSError, MemoryError),
    "tls_handshake": (OSError, ValueError, MemoryError),
    "link_io": (OSError, MemoryError),
    "pin": (ValueError,),
    "uart": (ValueError,),
    "spi": (ValueError,),
    "flash_write": (OSError,),
    # ntptime.settime(): DNS / socket timeout (OSError), a short or odd answer
    # (struct: ValueError), an RTC value out of range (OverflowError).
    "ntp": (OSError, ValueError, OverflowError, MemoryError),
}

# Everything Board.connect (DNS + TCP + TLS) can raise: one failed link attempt.
CONNECT_ERRORS = (OSError, ValueError, MemoryError)
# Everything a read or write on an open link can raise: the link is gone.
LINK_ERRORS = (OSError, MemoryError)
# One NTP query.
NTP_ERRORS = (OSError, ValueError, OverflowError, MemoryError)
# Opening a peripheral on a pin or bus the chip does not have.
PERIPHERAL_ERRORS = (ValueError, OSError)

