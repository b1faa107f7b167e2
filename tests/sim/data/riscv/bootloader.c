/* A bare-metal stand-in for an ESP-IDF 5.0 second-stage bootloader, built with Debian's
 * riscv64-unknown-elf GCC and `esptool elf2image --chip esp32c3`: RAM segments only and no
 * esp_bootloader_desc_t (ESP-IDF added that in 5.1). Like ESP-IDF's bootloader it keeps its
 * banner's compile time as a string literal ("compile time " __DATE__ " " __TIME__). */
#include <stdint.h>

const char bootloader_banner[] __attribute__((section(".dram0.rodata"), used)) =
    "I (%lu) %s: compile time " __DATE__ " " __TIME__ "\n";

volatile uint32_t boot_count __attribute__((section(".dram0.data"))) = 0;

__attribute__((section(".iram_loader.text"), noreturn))
void call_start_cpu0(void)
{
    boot_count++;
    for (;;) {
    }
}
