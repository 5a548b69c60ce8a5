"""Plain English paragraphs on varied topics, written for this project, used as calibration and evaluation text.

One paragraph per topic; ``lrq_ao.quality.texts`` splits them into sentences and the sentences into two disjoint
splits. Edit freely, but keep every sentence unique (a test checks it) and ending with ``.``, ``?`` or ``!``.
"""

PARAGRAPHS: tuple[str, ...] = (
    # Cooking
    "Bread starts with flour, water, salt and a little yeast. The dough needs time to rest so the gluten can relax. "
    "A hot oven gives the loaf a crisp crust and a soft, open crumb. Many bakers keep a sourdough starter alive for "
    "years by feeding it every day. If the kitchen is cold, the dough rises slowly and develops a deeper flavour. "
    "Steam during the first minutes of baking lets the crust expand before it sets. "
    "A loaf should cool on a rack before anyone cuts it, however tempting the smell may be. "
    "Stale bread is not waste, because it makes excellent croutons, crumbs and pudding.",
    # Astronomy
    "On a clear night far from the city, thousands of stars become visible to the naked eye. "
    "The band of the Milky Way is the light of billions of distant suns in our own galaxy. "
    "Planets do not twinkle as much as stars because they appear as tiny discs rather than points. "
    "Jupiter has dozens of moons, and four of them can be seen with ordinary binoculars. "
    "A total solar eclipse happens when the Moon covers the whole face of the Sun. "
    "Astronomers measure the distance to nearby stars by watching how they shift as the Earth orbits. "
    "Light from the most distant galaxies left them billions of years ago. "
    "Comets grow bright tails only when they come close enough to the Sun for their ice to evaporate.",
    # Bridges
    "The oldest bridges were probably logs laid across narrow streams. "
    "Roman engineers built stone arches that still carry traffic after two thousand years. "
    "An arch works because every stone presses against its neighbours and the load flows down to the ground. "
    "Suspension bridges hang their decks from steel cables draped between tall towers. "
    "Wind can make a long, light deck twist and oscillate if the design ignores aerodynamics. "
    "Modern cable-stayed bridges connect the deck directly to the towers with straight cables. "
    "Inspectors climb inside box girders to look for cracks, rust and loose bolts. "
    "Expansion joints let the structure grow and shrink as the temperature changes through the year.",
    # Gardening
    "Tomatoes need full sun, steady watering and a stake to keep the heavy stems upright. "
    "Compost made from kitchen scraps and fallen leaves feeds the soil and keeps it loose. "
    "Earthworms pull organic matter down into the ground and leave channels for air and water. "
    "Gardeners rotate crops so that pests and diseases do not build up in one bed. "
    "Beans and peas add nitrogen to the soil with the help of bacteria on their roots. "
    "A thick layer of mulch keeps weeds down and stops the soil from drying out in summer. "
    "Bees visit the flowers of squash early in the morning, before the petals close. "
    "Seeds saved from open-pollinated plants will grow into plants much like their parents.",
    # Weather
    "Clouds form when moist air rises, cools and its water vapour condenses on tiny particles. "
    "Thunderstorms draw their energy from warm, humid air near the ground. "
    "Lightning heats the air so quickly that it expands with a loud crack we call thunder. "
    "Counting the seconds between the flash and the sound tells you roughly how far away the storm is. "
    "Fog is simply a cloud that touches the ground. "
    "Forecasters use computer models that divide the atmosphere into millions of small boxes. "
    "A falling barometer often means that wind and rain are on the way. "
    "Snowflakes grow in many shapes depending on the temperature and humidity of the cloud.",
    # Programming
    "A good function does one thing and has a name that says what that thing is. "
    "Tests give programmers the confidence to change code without breaking what already works. "
    "Version control keeps a history of every change, so mistakes can be undone. "
    "A compiler translates source code into instructions that the processor can execute. "
    "Memory leaks happen when a program keeps allocating space it never gives back. "
    "Readable code is written for the next person who has to maintain it, who may be you in a year. "
    "Profiling shows where a program really spends its time, which is rarely where we guess. "
    "An error message should tell the user what went wrong and what to do about it.",
    # Music
    "A piano has eighty-eight keys that strike strings with felt-covered hammers. "
    "The violin family includes the viola, the cello and the double bass. "
    "Rhythm is the pattern of long and short sounds that makes us want to tap our feet. "
    "An orchestra tunes to the note played by the oboe before the concert begins. "
    "Jazz musicians often improvise new melodies over a familiar chord progression. "
    "Drums are among the oldest instruments, and every culture seems to have invented them. "
    "Learning to read music is a little like learning a new alphabet. "
    "Practising slowly and carefully is the fastest way to play a difficult passage well.",
    # Sports
    "A marathon is a little more than forty-two kilometres long. "
    "Swimmers shave fractions of a second by perfecting their turns at the wall. "
    "In football, a team that controls the middle of the field usually controls the game. "
    "Cyclists ride in a tight group to shelter each other from the wind. "
    "Good coaches teach players to recover from mistakes instead of dwelling on them. "
    "Tennis players must adapt their game to grass, clay and hard courts. "
    "Stretching and rest days prevent many of the injuries that stop young athletes. "
    "The crowd fell silent as the final penalty kick rolled slowly toward the corner of the net.",
    # Ocean
    "The ocean covers about seven tenths of the surface of our planet. "
    "Tides rise and fall twice a day under the pull of the Moon and the Sun. "
    "Coral reefs are built by tiny animals that live together in enormous colonies. "
    "Whales communicate with songs that can travel for hundreds of kilometres under water. "
    "The deepest trench in the Pacific is deeper than the tallest mountain is high. "
    "Sea water is salty because rivers have carried dissolved minerals into it for ages. "
    "Warm currents such as the Gulf Stream make some northern coasts surprisingly mild. "
    "Plastic waste collects in slowly turning gyres far from any shore.",
    # Trains
    "The first public steam railways carried coal before they carried passengers. "
    "A standard gauge track has rails a little less than one and a half metres apart. "
    "High-speed trains run on dedicated lines with gentle curves and no level crossings. "
    "Signals divide the line into blocks so that only one train occupies each block at a time. "
    "Electric locomotives draw power from overhead wires or a third rail. "
    "Night trains let travellers fall asleep in one country and wake up in another. "
    "Freight trains can be more than a kilometre long and need several locomotives. "
    "The station clock was famous for always being right, so people set their watches by it.",
    # Medicine
    "Vaccines train the immune system to recognise a germ before it can cause serious illness. "
    "Washing hands with soap is one of the cheapest ways to prevent infection. "
    "Antibiotics kill bacteria but do nothing against viruses such as the common cold. "
    "A fever is part of the body's defence, not simply a symptom to be suppressed. "
    "Regular exercise lowers blood pressure and improves sleep. "
    "Doctors listen to the heart with a stethoscope to hear how the valves open and close. "
    "Clinical trials compare a new treatment with the best existing one or with a placebo. "
    "Nurses often notice the small changes that warn of a patient getting worse.",
    # Economics
    "Prices rise when many people want something that is scarce. "
    "Inflation means that the same amount of money buys fewer goods than it did before. "
    "Central banks raise interest rates to cool an economy that is growing too fast. "
    "Trade lets each country specialise in what it produces most efficiently. "
    "A budget is a plan that matches expected income with planned spending. "
    "Compound interest makes savings grow faster the longer they are left alone. "
    "Small businesses employ a large share of workers in most countries. "
    "Markets can fail when buyers and sellers do not share the same information.",
    # Birds
    "Many songbirds fly thousands of kilometres each autumn to spend the winter in warmer lands. "
    "Owls hunt at night and can hear a mouse moving under the snow. "
    "Hummingbirds beat their wings so quickly that they seem to hang in the air. "
    "Crows are clever enough to use sticks as tools and to remember human faces. "
    "Penguins cannot fly, but they swim with astonishing speed and agility. "
    "A robin defends its territory by singing from a high branch at dawn. "
    "Feathers keep birds warm, dry and able to steer through the air. "
    "Bird watchers keep careful lists, and their records help scientists track changing populations.",
    # Mountains
    "Mountains form when plates of the Earth's crust collide and push rock upward. "
    "The air grows thinner and colder the higher you climb. "
    "Climbers spend weeks at base camp so their bodies can adjust to the altitude. "
    "Glaciers carve wide valleys with steep walls and flat floors. "
    "Weather in the mountains can change from sunshine to a snowstorm within an hour. "
    "Alpine flowers bloom quickly during the short summer above the tree line. "
    "Avalanches are most likely after heavy snowfall or a sudden rise in temperature. "
    "From the summit, the villages in the valley looked like toys scattered on a green carpet.",
    # Libraries
    "Public libraries lend books, music and films to anyone with a library card. "
    "Librarians help readers find reliable information among countless sources. "
    "Ancient libraries stored their texts on clay tablets and rolls of papyrus. "
    "A catalogue lets readers find a book by its author, title or subject. "
    "Quiet reading rooms offer a place to study away from the noise of the street. "
    "Many libraries now lend laptops, tools and even seeds for the garden. "
    "Rare manuscripts are kept in cool, dark rooms with carefully controlled humidity. "
    "Children who are read to at home often grow up to love books themselves.",
    # Chess
    "Chess is played on a board of sixty-four squares with sixteen pieces for each side. "
    "The knight is the only piece that can jump over others. "
    "Beginners are told to control the centre, develop their pieces and castle early. "
    "A pawn that reaches the far side of the board can be promoted to a queen. "
    "Strong players calculate many moves ahead but also rely on pattern and intuition. "
    "Computer programs now play chess far better than any human champion. "
    "An endgame with only kings and pawns can be surprisingly subtle. "
    "She resigned the game when she saw that checkmate could not be avoided.",
    # Coffee
    "Coffee beans are the roasted seeds of a cherry that grows on tropical shrubs. "
    "Light roasts keep more of the fruity flavours, while dark roasts taste of chocolate and smoke. "
    "Grinding the beans just before brewing preserves their aroma. "
    "Espresso is made by forcing hot water through finely ground coffee under high pressure. "
    "Too much caffeine late in the day can make it hard to fall asleep. "
    "Farmers on steep hillsides often pick the ripe cherries by hand. "
    "A café can become a second living room for writers, students and neighbours. "
    "The smell of fresh coffee drifted up the stairs and woke everyone in the house.",
    # Volcanoes
    "A volcano is an opening where molten rock, ash and gas escape from deep inside the Earth. "
    "Lava that is rich in silica is thick and sticky, so it tends to explode. "
    "Runny basalt lava can flow for many kilometres before it cools and hardens. "
    "Volcanic ash falls like grey snow and can ground aircraft across a whole continent. "
    "Soil made from old volcanic rock is often very fertile. "
    "Scientists monitor small earthquakes and swelling ground to predict eruptions. "
    "Some islands are nothing more than the tops of enormous undersea volcanoes. "
    "Hot springs and geysers are heated by magma lying not far below the surface.",
    # Photography
    "A camera records light that passes through a lens onto a sensor or film. "
    "The aperture controls how much light enters and how much of the scene is in focus. "
    "A fast shutter speed freezes motion, while a slow one turns moving water into silk. "
    "The soft light just after sunrise flatters almost any landscape. "
    "Good photographers think about what to leave out of the frame. "
    "A tripod lets you take sharp pictures in dim light without raising the sensitivity. "
    "Old family photographs become more precious with every passing year. "
    "He waited an hour for the clouds to part and light up the old lighthouse.",
    # Bicycles
    "A bicycle turns the push of a rider's legs into motion with remarkable efficiency. "
    "Gears let a cyclist keep a comfortable cadence on both hills and flat roads. "
    "Tyre pressure makes a surprising difference to speed, comfort and grip. "
    "Many cities have built protected lanes so that people feel safe riding to work. "
    "A chain needs regular cleaning and a little oil to run smoothly. "
    "Riding a bicycle is a skill that people rarely forget once they have learned it. "
    "Long-distance tourers carry tents, stoves and spare parts in bags on their racks. "
    "Did you remember to pack the pump and the spare inner tube?",
    # Everyday life
    "The alarm rang at six, but nobody in the flat wanted to get out of bed. "
    "We bought apples, cheese and a loaf of bread at the market on Saturday morning. "
    "Please close the window before you leave, because it looks like rain. "
    "The bus was late again, so I walked to the office along the river. "
    "My grandmother writes letters by hand and always adds a pressed flower. "
    "Moving house is tiring, but unpacking the last box feels wonderful. "
    "What time does the pharmacy close on public holidays? "
    "The neighbours' dog barks every time the postman opens the gate!",
    # History of writing
    "Writing was invented independently in several parts of the ancient world. "
    "The earliest scripts were used to keep records of grain, livestock and taxes. "
    "Alphabets use a small set of letters to represent the sounds of a language. "
    "The printing press made books far cheaper and spread new ideas across Europe. "
    "Before paper became common, scribes wrote on parchment made from animal skin. "
    "Some languages are written from right to left, and some from top to bottom. "
    "Deciphering a forgotten script often depends on finding the same text in a known language. "
    "Typewriters gave way to computers, yet the layout of their keyboard survives.",
    # Energy
    "Solar panels convert sunlight directly into electricity without moving parts. "
    "Wind turbines turn slowly, but their long blades sweep a huge area of air. "
    "Hydroelectric dams store water in reservoirs and release it through turbines when power is needed. "
    "Batteries let homes keep the electricity they generate during the day for use at night. "
    "Insulating a roof is one of the simplest ways to cut a heating bill. "
    "The electricity grid must balance supply and demand every second of every day. "
    "Heat pumps move warmth from the outside air into a house, even in winter. "
    "Burning coal releases carbon dioxide that has been locked underground for millions of years.",
    # Machine learning
    "A neural network learns by adjusting millions of weights to reduce its errors on examples. "
    "Training a large model can take weeks on thousands of processors. "
    "Quantization stores the weights of a network with fewer bits to save memory and time. "
    "A model that memorises its training data may fail on examples it has never seen. "
    "Researchers keep a separate test set to measure how well a model generalises. "
    "Text models split sentences into tokens before turning them into vectors. "
    "Attention lets each word in a sentence look at every other word to decide what matters. "
    "Careful evaluation matters more than a single impressive number on a leaderboard.",
    # Animals of the savanna
    "Elephants use their trunks to drink, to greet each other and to lift heavy branches. "
    "Lions rest for most of the day and hunt when the air is cooler. "
    "Giraffes can reach leaves at the tops of acacia trees that no other animal can touch. "
    "Zebras live in herds, and their stripes may confuse biting flies. "
    "During the dry season, animals gather around the few waterholes that remain. "
    "Vultures circle high above the plains, watching for a meal far below. "
    "Cheetahs are the fastest land animals, but they can only sprint for a short time. "
    "The rains return in spring, and the dusty plains turn green almost overnight.",
    # Architecture
    "Gothic cathedrals used pointed arches and flying buttresses to reach great heights. "
    "Large windows of stained glass filled the interiors with coloured light. "
    "Modern skyscrapers rest on steel frames, and their walls carry little weight. "
    "Thick earthen walls keep houses cool in hot, dry climates. "
    "A good architect considers how sunlight will move through a room during the day. "
    "Old factories are often converted into apartments, offices and galleries. "
    "Building codes exist because past disasters taught hard lessons about safety. "
    "The town square, with its fountain and café tables, was the heart of village life.",
)
