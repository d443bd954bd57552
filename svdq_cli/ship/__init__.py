"""What users do with a finished run or export: publish it on the Hub (``hub``), join LoRAs to it (``lora``),
time it (``bench``). May import stages/, run/, formats/ and everything below them; never cli/.
"""
