/* A bare-metal ESP32-C3 app whose call chain ends in a store to address 0, built with debug
 * information (-g -O0, so no call is inlined) by Debian's riscv64-unknown-elf GCC and turned
 * into an app image by `esptool elf2image --chip esp32c3`: the panic tests decode addresses in
 * its functions back to names and source lines. */
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

__attribute__((section(".flash.appdesc"), used))
const esp_app_desc_t esp_app_desc = {
    .magic_word = 0xABCD5432,
    .version = "3.1.0",
    .project_name = "panic_app",
    .idf_ver = "bare-metal gcc",
    .mmu_page_size = 16,
};

volatile uint32_t readings[4] __attribute__((section(".dram0.data"))) = {1, 2, 3, 4};

__attribute__((section(".flash.text"), noinline))
void store_result(volatile uint32_t *slot, uint32_t value)
{
    *slot = value; /* slot is NULL: a store access fault */
}

__attribute__((section(".flash.text"), noinline))
uint32_t process_reading(uint32_t index)
{
    uint32_t value = readings[index & 3] * 3u;
    store_result((volatile uint32_t *)0, value);
    return value;
}

__attribute__((section(".flash.text"), noinline))
void app_main(void)
{
    for (uint32_t i = 0; i < 4; i++) {
        process_reading(i);
    }
}

__attribute__((section(".iram0.text"), noreturn))
void call_start_cpu0(void)
{
    app_main();
    for (;;) {
    }
}
