"""What users' firmware projects leave and print: build outputs, ELF symbols and panics, Unity
test runs, NVS data.

``builds`` turns a path (ESP-IDF build directory, Arduino CLI output, PlatformIO project or
environment, merged image) into a flash plan; ``panic`` decodes a crash against the build's ELF;
``unity`` drives an ESP-IDF unit-test app's Unity menu; ``nvs`` writes a per-board NVS partition.
Nothing here reserves boards or knows the rack: callers pass paths, text and consoles.
"""
