/* A bare-metal ESP32-C3 app built with Debian's riscv64-unknown-elf GCC (-march=rv32imc
 * -mabi=ilp32), turned into an app image by `esptool elf2image --chip esp32c3`. It is a real
 * build the virtual rack did not make: it carries an esp_app_desc_t (as every ESP-IDF app does)
 * but no demo-app marker, and app_main writes to address 0, which faults on silicon. */
#include <stdint.h>

typedef struct {
    uint32_t magic_word;
    uint32_t secure_version;
    uint32_t reserv1[2];
    char version[32];
    char project_name[32];
    char time[16];
    char date[16];
    char idf_ver[32];
    uint8_t app_elf_sha256[32];
    uint16_t min_efuse_blk_rev_full;
    uint16_t max_efuse_blk_rev_full;
    uint8_t mmu_page_size;
    uint8_t reserv3[3];
    uint32_t reserv2[18];
} esp_app_desc_t;

_Static_assert(sizeof(esp_app_desc_t) == 256, "esp_app_desc_t is 256 bytes");

/* esptool elf2image puts .flash.appdesc first in the DROM segment and patches the ELF's SHA-256
 * into app_elf_sha256 (--elf-sha256-offset 0xb0). */
__attribute__((section(".flash.appdesc"), used))
const esp_app_desc_t esp_app_desc = {
    .magic_word = 0xABCD5432,
    .secure_version = 0,
    .version = APP_VERSION,
    .project_name = "riscv_null_store",
    .time = __TIME__,
    .date = __DATE__,
    .idf_ver = "bare-metal gcc " __VERSION__,
    .mmu_page_size = 16,
};

static const char greeting[] __attribute__((section(".flash.rodata"))) =
    "app_main: about to store to address 0\n";

volatile uint32_t counter __attribute__((section(".dram0.data"))) = 1;

__attribute__((section(".flash.text"), noinline))
void app_main(void)
{
    counter += (uint32_t)greeting[0];
    *(volatile uint32_t *)0 = counter; /* a store access fault on the chip */
}

__attribute__((section(".iram0.text"), noreturn))
void call_start_cpu0(void)
{
    app_main();
    for (;;) {
    }
}
