# ruff: noqa: E501  (the ingredient and dish tables read best one entry per line)
"""Tables behind the offline generator: ingredients with visual signatures, dish types, cooking methods.

Kept as compact text tables (parsed once, lazily, by :func:`catalog`) so the whole "world" of the synthetic
dataset can be read and edited in one place. Nothing here draws or writes; :mod:`tnlbt.data.synthetic` does.

Ingredient columns: ``name | title words | group | kind | colour | shapes | size | unit | adjectives``

* ``name`` is the cleaned name written to ``det_ingrs.json`` (what Recipe1M's extractor would give).
* ``kind``: ``visible`` (drawn as sprites), ``base`` (pasta/rice/...: a dense carpet under the rest),
  ``batter`` (mixed into a dough/batter colour; drawn as sprites only outside batter dishes, if it has a shape),
  ``liquid`` (tints soups, drinks and sauces), ``pantry`` (salt, water, oil: shows nothing).
* ``shapes``: the first is the default; the recipe line's preparation word picks one ("sliced" -> round,
  "diced" -> cube), so the text says which shape the photo shows.
* ``size``: s / m / l sprite size; ``unit``: how quantities are written (see ``UNITS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

_INGREDIENTS = """
tomatoes|Tomato/Roma Tomato|veg|visible|d8321e|cube,round,wedge|m|count|ripe/fresh/roma
cherry tomatoes|Cherry Tomato|veg|visible|e8251b|whole,round|s|cup|
onion|Onion|veg|visible|efe3c2|cube,ring|m|count|yellow/sweet/white
red onion|Red Onion|veg|visible|9b2f6b|ring,cube|m|count|
green onions|Scallion/Green Onion|veg|visible|5fb33a|ring|s|count|
garlic|Garlic|veg|visible|f6efd6|dot|s|clove|
carrots|Carrot|veg|visible|f07a14|round,cube,strand|m|count|baby/large
celery|Celery|veg|visible|a9d46a|cube,round|m|stalk|
potatoes|Potato|veg|visible|e6c371|cube,wedge,round|l|count|russet/red/yukon gold
sweet potatoes|Sweet Potato|veg|visible|e2731f|cube,round,wedge|l|count|
green bell pepper|Green Pepper/Bell Pepper|veg|visible|2f9a2a|strip,cube|m|count|
red bell pepper|Red Pepper/Bell Pepper|veg|visible|d01f1f|strip,cube|m|count|
yellow bell pepper|Yellow Pepper|veg|visible|f6c813|strip,cube|m|count|
jalapeno peppers|Jalapeno|veg|visible|3d8c29|ring|s|count|
zucchini|Zucchini|veg|visible|7fae42|round,cube,strand|m|count|
eggplant|Eggplant|veg|visible|4e2553|cube,round|l|count|
mushrooms|Mushroom|veg|visible|a68a6a|round,chunk|m|oz|button/cremini/fresh
broccoli|Broccoli|veg|visible|2c7d2a|chunk|m|cup|
cauliflower|Cauliflower|veg|visible|eee6cf|chunk|m|cup|
cabbage|Cabbage|veg|visible|c3dd8e|strand,chunk|m|cup|green
red cabbage|Red Cabbage|veg|visible|7c2a6e|strand|m|cup|
cucumber|Cucumber|veg|visible|9fd17a|round,cube|m|count|english
corn|Corn|veg|visible|f5d22e|dot|s|cup|frozen/sweet
peas|Pea|veg|visible|63bd37|dot|s|cup|frozen/green
green beans|Green Bean|veg|visible|4a9a32|strip|m|cup|fresh
asparagus|Asparagus|veg|visible|6a9e36|strip|m|bunch|fresh
avocado|Avocado|veg|visible|a9c95a|cube,wedge|m|count|ripe
beets|Beet|veg|visible|8e1438|cube,round|m|count|
radishes|Radish|veg|visible|e4506a|round|s|count|
leeks|Leek|veg|visible|d2e6a4|ring|m|count|
shallots|Shallot|veg|visible|b77a80|cube|s|count|
butternut squash|Butternut Squash/Squash|veg|visible|f19327|cube|m|cup|
pumpkin puree|Pumpkin|veg|visible|e8801a|blob|l|can|
artichoke hearts|Artichoke|veg|visible|bcc283|chunk|m|can|
black olives|Olive|veg|visible|262626|ring|s|can|sliced
green olives|Green Olive|veg|visible|808f26|whole|s|cup|
pickles|Pickle|veg|visible|93a53a|round|s|count|dill
sun-dried tomatoes|Sun-Dried Tomato|veg|visible|8c2717|strip|s|cup|
brussels sprouts|Brussels Sprout|veg|visible|699c36|whole|m|lb|
okra|Okra|veg|visible|588a36|round|s|cup|
snow peas|Snow Pea|veg|visible|7cbd4a|strip|m|cup|
bean sprouts|Bean Sprout|veg|visible|efefcc|strand|s|cup|
fennel|Fennel|veg|visible|dbe8bd|strip|m|count|
parsnips|Parsnip|veg|visible|e8dcb0|round|m|count|
turnips|Turnip|veg|visible|e6d2e0|cube|m|count|
chile peppers|Chile/Chili Pepper|veg|visible|c2121a|ring|s|count|red/fresh
spinach|Spinach|leafy|visible|2c6b22|leaf|m|cup|fresh/baby
kale|Kale|leafy|visible|29592b|leaf|m|bunch|
lettuce|Lettuce|leafy|visible|90d35a|leaf|l|head|iceberg/butter
romaine lettuce|Romaine|leafy|visible|6db542|leaf|l|head|
arugula|Arugula|leafy|visible|4c8a2c|leaf|s|cup|baby
mixed greens|Greens|leafy|visible|5a9c3a|leaf|m|cup|
watercress|Watercress|leafy|visible|3f7f2c|leaf|s|bunch|
swiss chard|Chard|leafy|visible|3b6e2a|leaf|l|bunch|
apples|Apple|fruit|visible|cf3a2e|wedge,cube|m|count|granny smith/tart/large
bananas|Banana|fruit|visible|f4e27a|round|m|count|ripe
strawberries|Strawberry|fruit|visible|d8233c|round,whole|m|cup|fresh
blueberries|Blueberry|fruit|visible|3a4ca0|whole|s|cup|fresh/frozen
raspberries|Raspberry|fruit|visible|c8285a|whole|s|cup|fresh
blackberries|Blackberry|fruit|visible|2c1a40|whole|s|cup|
lemon|Lemon|fruit|visible|f7ea45|wedge,round|m|count|
lime|Lime|fruit|visible|86d03a|wedge,round|m|count|
oranges|Orange|fruit|visible|f5961a|wedge,round|m|count|navel
mango|Mango|fruit|visible|f8b02e|cube|m|count|ripe
pineapple|Pineapple|fruit|visible|f6d744|cube,wedge|m|cup|fresh
peaches|Peach|fruit|visible|f5a263|wedge|m|count|ripe
pears|Pear|fruit|visible|d8d585|wedge|m|count|
grapes|Grape|fruit|visible|7b3c7b|whole|s|cup|red/seedless
cranberries|Cranberry|fruit|visible|a80e2a|whole|s|cup|dried/fresh
raisins|Raisin|fruit|visible|4a2820|dot|s|cup|
dates|Date|fruit|visible|6c381c|chunk|s|cup|
cherries|Cherry|fruit|visible|990d1f|whole|s|cup|
shredded coconut|Coconut|fruit|visible|f8f5ee|strand|s|cup|sweetened
kiwi|Kiwi|fruit|visible|8cbb36|round|m|count|
watermelon|Watermelon|fruit|visible|f14c68|cube|l|cup|
pomegranate seeds|Pomegranate|fruit|visible|b51030|dot|s|cup|
figs|Fig|fruit|visible|6d3858|wedge|m|count|fresh
apricots|Apricot|fruit|visible|f29e46|wedge|m|count|dried
plums|Plum|fruit|visible|6a1a4a|wedge|m|count|
cantaloupe|Cantaloupe/Melon|fruit|visible|f7a25a|cube|m|cup|
basil|Basil|herb|visible|2d8e38|leaf|s|herb|fresh
parsley|Parsley|herb|visible|3a922c|leaf,dot|s|herb|fresh/flat-leaf
cilantro|Cilantro|herb|visible|47a03a|leaf,dot|s|herb|fresh
mint|Mint|herb|visible|4db35a|leaf|s|herb|fresh
rosemary|Rosemary|herb|visible|4a6a3c|strand|s|herb|fresh
thyme|Thyme|herb|visible|6a7e48|dot|s|herb|fresh/dried
dill|Dill|herb|visible|6ea44a|strand|s|herb|fresh
chives|Chive|herb|visible|3c8c2c|dot|s|herb|fresh
sage|Sage|herb|visible|8aa27e|leaf|s|herb|fresh
chicken breasts|Chicken|meat|visible|f3d2b4|cube,strip,chunk|l|lb|boneless skinless
chicken thighs|Chicken Thigh/Chicken|meat|visible|e5bd92|chunk|l|lb|boneless
ground beef|Beef/Hamburger|meat|visible|7a3726|crumble|m|lb|lean
beef sirloin|Steak/Beef|meat|visible|8c261e|strip,chunk|l|lb|
pork chops|Pork Chop/Pork|meat|visible|e8b39c|chunk|l|count|boneless
pork tenderloin|Pork|meat|visible|e0a08a|round|l|lb|
bacon|Bacon|meat|visible|b1402f|strip|m|slice|thick-cut
ham|Ham|meat|visible|ea9898|cube|m|cup|cooked
sausage|Sausage|meat|visible|a2502f|round|m|lb|smoked
italian sausage|Sausage|meat|visible|a95a3a|crumble|m|lb|sweet/hot
ground turkey|Turkey|meat|visible|c8987c|crumble|m|lb|lean
turkey breast|Turkey|meat|visible|f0d0b4|strip|l|lb|
lamb|Lamb|meat|visible|9a342a|chunk|l|lb|
chorizo|Chorizo|meat|visible|b82d18|round|m|oz|
pepperoni|Pepperoni|meat|visible|c42a1a|round|m|oz|sliced
prosciutto|Prosciutto|meat|visible|dc7c8a|strip|m|oz|
meatballs|Meatball|meat|visible|6a301e|whole|m|lb|frozen
ground pork|Pork|meat|visible|d49c84|crumble|m|lb|
shrimp|Shrimp|seafood|visible|f5a085|curl|m|lb|large/peeled
salmon fillets|Salmon|seafood|visible|f2844f|chunk|l|count|
tuna|Tuna|seafood|visible|c79c84|crumble|m|can|canned
cod fillets|Cod/Fish|seafood|visible|f4efe4|chunk|l|lb|
tilapia fillets|Tilapia/Fish|seafood|visible|ede4d6|chunk|l|count|
scallops|Scallop|seafood|visible|f1e2c6|whole|m|lb|sea
crab meat|Crab|seafood|visible|f2d2c2|strand|s|oz|lump
mussels|Mussel|seafood|visible|29283a|wedge|m|lb|
clams|Clam|seafood|visible|d6c7b2|whole|m|count|
squid|Calamari/Squid|seafood|visible|f1ede0|ring|m|lb|
anchovies|Anchovy|seafood|visible|6d685c|strip|s|count|
smoked salmon|Smoked Salmon/Lox|seafood|visible|f0743f|strip|m|oz|
cheddar cheese|Cheddar/Cheese|cheese|visible|f2a530|strand,cube|s|cup|sharp/mild
mozzarella cheese|Mozzarella/Cheese|cheese|visible|f8f2e0|strand,round|s|cup|fresh/part-skim
parmesan cheese|Parmesan|cheese|visible|efe2b8|powder|s|cup|grated
feta cheese|Feta|cheese|visible|fbfaf2|crumble,cube|s|cup|
goat cheese|Goat Cheese|cheese|visible|f7f5ec|crumble|s|oz|
swiss cheese|Swiss Cheese|cheese|visible|f2e4a8|round|m|slice|
monterey jack cheese|Jack Cheese/Cheese|cheese|visible|f7e9c4|strand|s|cup|
blue cheese|Blue Cheese|cheese|visible|dfe4e6|crumble|s|cup|
ricotta cheese|Ricotta|cheese|visible|fbf8ef|blob|m|cup|
cream cheese|Cream Cheese|dairy|batter|fbf7ee|blob|m|oz|softened
sour cream|Sour Cream|dairy|visible|fcfaf2|blob|m|cup|
plain yogurt|Yogurt|dairy|batter|f8f5ee|blob|m|cup|greek
whipped cream|Whipped Cream/Cream|dairy|visible|fffdf6|blob|m|cup|
vanilla ice cream|Ice Cream|dairy|visible|f6edcc|whole|l|cup|
eggs|Egg|egg|batter|f5cf3c|egg|m|count|large
butter|Butter|dairy|batter|f6de86|cube|s|tbsp|unsalted/softened
milk|Milk|liquid|liquid|fbfbf5|none|m|cup|whole/skim
heavy cream|Cream|liquid|liquid|fbf4e4|none|m|cup|
coconut milk|Coconut|liquid|liquid|f7f2e6|none|m|can|light
chicken broth|Chicken|liquid|liquid|e6c270|none|m|cup|low-sodium
beef broth|Beef|liquid|liquid|74452a|none|m|cup|
vegetable broth|Vegetable|liquid|liquid|c6a655|none|m|cup|
orange juice|Orange|liquid|liquid|f79e26|none|m|cup|fresh
red wine|Wine|liquid|liquid|6c1026|none|m|cup|dry
coffee|Coffee/Mocha|liquid|liquid|3a2112|none|m|cup|brewed
almond milk|Almond|liquid|liquid|efe4d0|none|m|cup|unsweetened
tomato paste|Tomato|liquid|liquid|a3190f|none|s|tbsp|
spaghetti|Spaghetti/Pasta|pasta|base|f1d286|strand|m|pkg|
linguine|Linguine/Pasta|pasta|base|efcc7c|strand|m|pkg|
penne pasta|Penne/Pasta|pasta|base|f0ca78|strip|m|pkg|
elbow macaroni|Macaroni/Mac|pasta|base|f3d070|curl|s|cup|
egg noodles|Noodle|pasta|base|f5d884|strand|m|pkg|wide
rice noodles|Rice Noodle/Noodle|pasta|base|f7f3e6|strand|m|pkg|
lasagna noodles|Lasagna|pasta|base|f0d08c|strip|l|count|
white rice|Rice|grain|base|f8f6ee|dot|s|cup|long-grain/cooked
brown rice|Brown Rice/Rice|grain|base|c8a472|dot|s|cup|cooked
quinoa|Quinoa|grain|base|e5d3a2|dot|s|cup|cooked
couscous|Couscous|grain|base|ead79a|dot|s|cup|
rolled oats|Oat/Oatmeal|grain|base|d8bd84|dot|s|cup|old-fashioned
tortillas|Tortilla|tortilla|visible|ecd49c|round|l|count|flour/corn
bread|Bread/Toast|bread|visible|d7a15a|square,cube|l|slice|french/crusty/whole wheat
hamburger buns|Burger|bread|visible|d99a4e|round|l|count|toasted
bagels|Bagel|bread|visible|c98a46|ring|l|count|plain/everything
breadcrumbs|Crumb|crumbs|visible|d5aa60|powder|s|cup|dry/panko
crushed crackers|Cracker|crumbs|visible|e0b870|powder|s|cup|buttery
pizza dough|Pizza|dough|batter|eed7a4|none|m|lb|
pie crust|Pie|crust|batter|e8c07a|none|m|crust|refrigerated
puff pastry|Puff Pastry|crust|batter|f0cf8a|none|m|crust|frozen
black beans|Black Bean/Bean|legume|visible|2a2030|bean|s|can|
kidney beans|Kidney Bean/Bean|legume|visible|7a1c22|bean|s|can|red
chickpeas|Chickpea|legume|visible|dfbd74|whole|s|can|
lentils|Lentil|legume|visible|a6662c|dot|s|cup|dry/red
cannellini beans|White Bean/Bean|legume|visible|f2e9d8|bean|s|can|
pinto beans|Pinto Bean/Bean|legume|visible|b3806a|bean|s|can|
edamame|Edamame|legume|visible|78ba46|bean|s|cup|shelled
tofu|Tofu|legume|visible|f6efd8|cube|m|oz|firm/extra-firm
refried beans|Bean|legume|visible|8a5836|blob|m|can|
sliced almonds|Almond|nut|visible|e8d0a2|wedge|s|cup|toasted
walnuts|Walnut|nut|visible|9e6c36|chunk|s|cup|chopped/toasted
pecans|Pecan|nut|visible|7a4826|chunk|s|cup|chopped
peanuts|Peanut|nut|visible|c88e46|bean|s|cup|roasted
cashews|Cashew|nut|visible|eed6a4|curl|s|cup|raw/roasted
pine nuts|Pine Nut|nut|visible|efdfae|bean|s|tbsp|toasted
sesame seeds|Sesame|nut|visible|f4ead0|dot|s|tbsp|toasted
sunflower seeds|Sunflower|nut|visible|8a8a78|dot|s|tbsp|
chia seeds|Chia|nut|visible|38383c|dot|s|tbsp|
peanut butter|Peanut Butter|nut|batter|b67836|blob|m|tbsp|creamy
tomato sauce|Tomato/Marinara|sauce|visible|b2230f|blob|l|can|
marinara sauce|Marinara/Tomato|sauce|visible|a4241a|blob|l|cup|
pesto|Pesto/Basil|sauce|visible|4d7e28|blob|m|cup|basil
salsa|Salsa|sauce|visible|c63c28|crumble|m|cup|chunky
barbecue sauce|BBQ/Barbecue|sauce|visible|69200f|blob|m|cup|
ketchup|Ketchup|sauce|visible|c21e16|blob|s|tbsp|
mayonnaise|Mayo|sauce|visible|f8f0d4|blob|s|tbsp|light
dijon mustard|Mustard/Dijon|sauce|visible|d8ae26|blob|s|tbsp|
hummus|Hummus|sauce|visible|dbbe86|blob|l|cup|
guacamole|Guacamole|sauce|visible|88b046|blob|l|cup|
alfredo sauce|Alfredo/Creamy|sauce|visible|f3ead0|blob|l|cup|
curry paste|Curry|sauce|liquid|c97a26|none|s|tbsp|red/green
honey|Honey|drizzle|visible|e6a626|drizzle|s|tbsp|
maple syrup|Maple|drizzle|visible|b65e18|drizzle|s|tbsp|pure
teriyaki sauce|Teriyaki|drizzle|visible|4a2810|drizzle|s|tbsp|
balsamic vinegar|Balsamic|drizzle|visible|3a1818|drizzle|s|tbsp|
ranch dressing|Ranch|drizzle|visible|f5f0e2|drizzle|s|tbsp|
chocolate syrup|Chocolate|drizzle|visible|3a1e10|drizzle|s|tbsp|
caramel sauce|Caramel|drizzle|visible|c27826|drizzle|s|tbsp|
soy sauce|Soy/Asian|drizzle|liquid|3a2414|none|s|tbsp|low-sodium
all-purpose flour|Flour|batter|batter|f7f4ec|none|m|cup|
white sugar|Sugar|batter|batter|fbfbfa|none|m|cup|
brown sugar|Brown Sugar|batter|batter|a6703a|none|m|cup|packed
powdered sugar|Sugar|batter|visible|ffffff|powder|s|cup|
cocoa powder|Chocolate/Cocoa|batter|batter|59321f|none|m|cup|unsweetened
cornmeal|Cornbread/Corn|batter|batter|eac55a|none|m|cup|yellow
chocolate chips|Chocolate Chip/Chocolate|sweet|visible|3a2014|dot|s|cup|semisweet
mini marshmallows|Marshmallow|sweet|visible|fcfcf8|cube|s|cup|
sprinkles|Sprinkle/Funfetti|sweet|visible|e84ca0|dot|s|tbsp|rainbow
ground cinnamon|Cinnamon|spice|visible|a05e26|powder|s|tsp|
paprika|Paprika|spice|visible|c23c1c|powder|s|tsp|smoked
chili powder|Chili|spice|visible|a8361c|powder|s|tsp|
ground cumin|Cumin|spice|visible|a07628|powder|s|tsp|
ground turmeric|Turmeric|spice|visible|e29e16|powder|s|tsp|
red pepper flakes|Spicy|spice|visible|c4361a|dot|s|tsp|crushed
curry powder|Curry|spice|visible|c89028|powder|s|tsp|
italian seasoning|Herb|spice|visible|6a7a38|powder|s|tsp|dried
ginger|Ginger|spice|visible|e8cf96|dot|s|tsp|fresh/grated
cayenne pepper|Cajun/Spicy|spice|visible|c22e1a|powder|s|pinch|
salt|Salt|pantry|pantry|ffffff|none|s|tsp|kosher/sea
black pepper|Pepper|pantry|pantry|2a2a2a|none|s|tsp|ground
salt and pepper|Salt|pantry|pantry|ffffff|none|s|taste|
water|Water|pantry|pantry|ffffff|none|m|cup|warm/cold
olive oil|Olive Oil|pantry|pantry|c8b43a|none|s|tbsp|extra-virgin
vegetable oil|Oil|pantry|pantry|e8d060|none|s|tbsp|
garlic powder|Garlic|pantry|pantry|ece0c0|none|s|tsp|
onion powder|Onion|pantry|pantry|ecdcb8|none|s|tsp|
baking powder|Baking|pantry|pantry|ffffff|none|s|tsp|
baking soda|Baking|pantry|pantry|ffffff|none|s|tsp|
vanilla extract|Vanilla|pantry|pantry|5a3a1a|none|s|tsp|pure
cornstarch|Cornstarch|pantry|pantry|ffffff|none|s|tbsp|
active dry yeast|Yeast|pantry|pantry|d8c89a|none|s|tsp|
lemon juice|Lemon|pantry|pantry|f6f0b0|none|s|tbsp|fresh
white vinegar|Vinegar|pantry|pantry|f8f8f0|none|s|tbsp|
worcestershire sauce|Worcestershire|pantry|pantry|3a2414|none|s|tsp|
"""

# Dish columns: key | names | vessel | layout | methods | slots (group:min-max, ...) | weight
# layouts: scatter (mixed), pile, sectors (separate regions), bands (layers), stack, skewer, grid (many items),
#          blend (uniform colour), liquid (pieces floating in a tinted liquid), disc (a base disc with toppings),
#          wrap (rolled cross-sections)
_DISHES = """
salad|Salad/Garden Salad/Chopped Salad|bowl|scatter|toss,raw|leafy:1-2,veg:1-4,fruit:0-1,cheese:0-1,nut:0-1,drizzle:0-1,pantry:0-2|10
fruit salad|Fruit Salad/Fruit Bowl|bowl|scatter|toss,raw|fruit:3-6,herb:0-1,drizzle:0-1,nut:0-1|4
pasta|Pasta/Noodles|plate|pile|boil,saute|pasta:1-1,veg:1-3,meat:0-1,cheese:0-1,sauce:0-1,herb:0-1,pantry:1-2|10
baked pasta|Pasta Bake/Baked Pasta/Casserole|baking dish|scatter|bake|pasta:1-1,cheese:1-2,sauce:0-1,meat:0-1,veg:0-2,herb:0-1,pantry:1-2|5
soup|Soup/Chowder|bowl|liquid|simmer,boil|liquid:1-2,veg:2-4,meat:0-1,legume:0-1,herb:0-1,spice:0-1,pantry:1-3|9
cream soup|Cream Soup/Bisque/Puree|bowl|blend|blend|liquid:1-2,veg:1-3,dairy:0-1,spice:0-1,herb:0-1,pantry:1-2|3
stew|Stew/Ragout|pot|liquid|simmer|liquid:1-2,meat:1-1,veg:2-4,herb:0-1,spice:0-1,pantry:1-3|5
chili|Chili|pot|liquid|simmer|meat:1-1,legume:1-2,veg:1-3,sauce:0-1,spice:1-2,cheese:0-1,pantry:1-2|4
stir fry|Stir-Fry/Stir Fry|skillet|scatter|saute,fry|meat:0-1,seafood:0-1,veg:2-4,drizzle:1-2,spice:0-1,nut:0-1,pantry:1-2|8
fried rice|Fried Rice/Rice Skillet|skillet|scatter|fry,saute|grain:1-1,veg:2-3,meat:0-1,seafood:0-1,drizzle:1-1,pantry:1-2|4
casserole|Casserole/Bake/Hotdish|baking dish|scatter|bake|meat:0-1,veg:2-3,cheese:1-2,dairy:0-1,crumbs:0-1,spice:0-1,pantry:1-2|6
pizza|Pizza/Flatbread|board|disc|bake|dough:1-1,sauce:1-1,cheese:1-2,meat:0-2,veg:1-3,herb:0-1|6
tacos|Tacos/Taco|plate|grid|fry,grill,saute|tortilla:1-1,meat:0-1,seafood:0-1,veg:1-3,cheese:0-1,sauce:0-1,herb:0-1,spice:0-1|5
sandwich|Sandwich/Sub/Panini|board|bands|grill,raw|bread:1-1,meat:1-2,cheese:0-1,leafy:0-1,veg:0-2,sauce:0-1|6
burger|Burger/Burgers|plate|stack|grill,fry|meat:1-1,bread:1-1,cheese:0-1,leafy:0-1,veg:1-2,sauce:0-2,pantry:0-1|4
smoothie|Smoothie/Shake|glass|blend|blend|fruit:2-4,liquid:1-1,dairy:0-1,nut:0-1,sweet:0-1|5
cake|Cake/Layer Cake|plate|bands|bake|batter:2-4,egg:0-1,dairy:1-2,fruit:0-2,sweet:0-1,nut:0-1,pantry:1-3|6
cookies|Cookies/Cookie|sheet|grid|bake|batter:2-3,egg:0-1,dairy:1-1,sweet:0-1,nut:0-1,fruit:0-1,pantry:1-3|5
muffins|Muffins/Cupcakes|tin|grid|bake|batter:2-3,egg:0-1,dairy:1-1,fruit:0-2,nut:0-1,sweet:0-1,pantry:1-2|4
pancakes|Pancakes/Hotcakes|plate|stack|fry|batter:1-2,egg:0-1,dairy:0-1,fruit:0-2,drizzle:0-1,sweet:0-1,pantry:1-2|4
omelette|Omelette/Frittata/Scramble|skillet|disc|fry,bake|egg:1-1,dairy:0-1,veg:1-3,meat:0-1,cheese:0-1,herb:0-1,pantry:1-2|5
rice bowl|Rice Bowl/Buddha Bowl/Poke Bowl|bowl|sectors|raw,saute,grill|grain:1-1,veg:2-3,meat:0-1,seafood:0-1,legume:0-1,sauce:0-1,nut:0-1|6
curry|Curry/Masala|bowl|liquid|simmer|liquid:1-2,meat:0-1,legume:0-1,veg:2-3,spice:1-2,herb:0-1,pantry:1-2|5
skewers|Skewers/Kabobs/Kebabs|platter|skewer|grill|meat:0-1,seafood:0-1,veg:2-3,fruit:0-1,drizzle:0-1,spice:0-1,pantry:1-2|5
sheet pan|Sheet Pan Dinner/Roast/Tray Bake|sheet|scatter|roast|meat:0-1,seafood:0-1,veg:2-4,herb:0-1,spice:0-1,pantry:1-2|6
grilled plate|Plate/Dinner|plate|sectors|grill,fry,roast|meat:0-1,seafood:0-1,veg:1-2,grain:0-1,sauce:0-1,herb:0-1,pantry:1-2|7
pie|Pie/Tart/Crumble|pie dish|disc|bake|crust:0-1,fruit:1-3,batter:1-2,dairy:0-1,nut:0-1,spice:0-1,pantry:1-2|5
dip|Dip/Spread|bowl|liquid|blend,bake|sauce:1-2,cheese:0-2,veg:0-2,spice:0-1,herb:0-1,pantry:0-1|4
wrap|Wrap/Burrito/Roll-Up|board|wrap|raw,grill|tortilla:1-1,meat:0-1,legume:0-1,grain:0-1,veg:1-3,cheese:0-1,sauce:0-1|5
parfait|Parfait/Trifle|glass|bands|raw|dairy:1-2,fruit:1-3,grain:0-1,nut:0-1,drizzle:0-1,sweet:0-1|3
oatmeal|Oatmeal/Porridge/Breakfast Bowl|bowl|scatter|boil,simmer|grain:1-1,liquid:1-1,fruit:1-3,nut:0-1,drizzle:0-1,spice:0-1|3
noodle soup|Noodle Soup/Ramen/Pho|bowl|liquid|simmer,boil|liquid:1-1,pasta:1-1,veg:1-3,meat:0-1,seafood:0-1,herb:0-1,dairy:0-1|4
quiche|Quiche/Tart|pie dish|disc|bake|crust:1-1,egg:1-1,dairy:0-1,veg:1-3,meat:0-1,cheese:1-1,herb:0-1,pantry:1-2|3
toast|Toast/Bruschetta/Crostini|board|grid|grill,bake,raw|bread:1-1,veg:1-2,cheese:0-1,sauce:0-1,herb:0-1,drizzle:0-1|4
"""

# Cooking methods: verb, past-tense adjective for titles, how the look changes.
# tint: (r, g, b, strength) colours are pulled toward; stripes: grill marks; mixed: pieces mingle (vs separate)
METHODS: dict[str, dict] = {
    "bake": {"verb": "bake", "adj": "Baked", "tint": (150, 95, 40, 0.22), "mixed": True},
    "roast": {"verb": "roast", "adj": "Roasted", "tint": (110, 60, 25, 0.32), "mixed": True},
    "grill": {"verb": "grill", "adj": "Grilled", "tint": (120, 70, 35, 0.18), "stripes": True, "mixed": False},
    "fry": {"verb": "fry", "adj": "Fried", "tint": (205, 140, 45, 0.35), "outline": True, "mixed": True},
    "saute": {"verb": "saute", "adj": "Sauteed", "tint": (140, 90, 40, 0.12), "mixed": True},
    "boil": {"verb": "boil", "adj": "Boiled", "tint": (232, 230, 220, 0.16), "mixed": True},
    "simmer": {"verb": "simmer", "adj": "Slow-Simmered", "tint": (170, 110, 60, 0.10), "mixed": True},
    "blend": {"verb": "blend", "adj": "Blended", "tint": (0, 0, 0, 0.0), "mixed": True},
    "toss": {"verb": "toss", "adj": "Tossed", "tint": (0, 0, 0, 0.0), "mixed": True},
    "raw": {"verb": "chill", "adj": "Fresh", "tint": (0, 0, 0, 0.0), "mixed": False},
}

# Quantity vocabularies: (text, value); value / typical -> how much of the ingredient shows.
UNITS: dict[str, dict] = {
    "cup": {"q": [("1/4", 0.25), ("1/3", 0.33), ("1/2", 0.5), ("3/4", 0.75), ("1", 1.0), ("1 1/2", 1.5),
                  ("2", 2.0), ("3", 3.0)], "typ": 0.75, "one": ["cup"], "many": ["cups"]},
    "tbsp": {"q": [("1", 1.0), ("2", 2.0), ("3", 3.0), ("4", 4.0)], "typ": 2.0,
             "one": ["tablespoon", "tbsp.", "Tbsp"], "many": ["tablespoons", "tbsp.", "Tbsp"]},
    "tsp": {"q": [("1/4", 0.25), ("1/2", 0.5), ("1", 1.0), ("2", 2.0)], "typ": 0.75,
            "one": ["teaspoon", "tsp.", "tsp"], "many": ["teaspoons", "tsp.", "tsp"]},
    "count": {"q": [("1", 1.0), ("2", 2.0), ("3", 3.0), ("4", 4.0), ("6", 6.0)], "typ": 2.0,
              "one": [""], "many": [""]},
    "lb": {"q": [("1/2", 0.5), ("1", 1.0), ("1 1/2", 1.5), ("2", 2.0), ("3", 3.0)], "typ": 1.25,
           "one": ["pound", "lb.", "lb"], "many": ["pounds", "lbs.", "lbs"]},
    "oz": {"q": [("4", 4.0), ("6", 6.0), ("8", 8.0), ("12", 12.0), ("16", 16.0)], "typ": 8.0,
           "one": ["ounce"], "many": ["ounces", "oz.", "oz"]},
    "clove": {"q": [("1", 1.0), ("2", 2.0), ("3", 3.0), ("4", 4.0), ("6", 6.0)], "typ": 3.0,
              "one": ["clove"], "many": ["cloves"]},
    "can": {"q": [("1", 1.0), ("2", 2.0)], "typ": 1.0, "one": ["(15 ounce) can", "(14.5 oz) can", "can"],
            "many": ["(15 ounce) cans", "(14.5 oz) cans", "cans"]},
    "pkg": {"q": [("1/2", 0.5), ("1", 1.0), ("2", 2.0)], "typ": 1.0,
            "one": ["(16 ounce) package", "(8 ounce) package", "package"],
            "many": ["(16 ounce) packages", "packages"]},
    "bunch": {"q": [("1", 1.0), ("2", 2.0)], "typ": 1.0, "one": ["bunch"], "many": ["bunches"]},
    "herb": {"q": [("1 tablespoon", 1.0), ("2 tablespoons", 2.0), ("3 sprigs", 1.5), ("1/4 cup", 4.0),
                   ("1/2 cup", 8.0)], "typ": 2.5, "one": [""], "many": [""]},
    "head": {"q": [("1", 1.0), ("2", 2.0)], "typ": 1.0, "one": ["head"], "many": ["heads"]},
    "crust": {"q": [("1", 1.0), ("2", 2.0)], "typ": 1.0, "one": ["(9 inch)", "sheet"], "many": ["(9 inch)", "sheets"]},
    "stalk": {"q": [("1", 1.0), ("2", 2.0), ("3", 3.0), ("4", 4.0)], "typ": 2.0,
              "one": ["stalk"], "many": ["stalks"]},
    "slice": {"q": [("2", 2.0), ("4", 4.0), ("6", 6.0), ("8", 8.0)], "typ": 4.0,
              "one": ["slice"], "many": ["slices"]},
    "pinch": {"q": [("1", 1.0), ("2", 2.0)], "typ": 1.0, "one": ["pinch"], "many": ["pinches"]},
    "taste": {"q": [("", 1.0)], "typ": 1.0, "one": [""], "many": [""]},
}

# Preparation words per shape: (before the name, after a comma). The shape drawn follows the words used.
PREP: dict[str, tuple[list[str], list[str]]] = {
    "cube": (["diced", "cubed", "chopped"], ["diced", "cut into 1/2 inch cubes", "chopped", "cubed"]),
    "round": (["sliced", "thinly sliced"], ["sliced", "cut into rounds", "thinly sliced"]),
    "wedge": ([], ["cut into wedges", "quartered", "cut into 8 wedges"]),
    "ring": (["sliced"], ["sliced into rings", "cut into thin rings", "sliced"]),
    "strand": (["shredded", "julienned", "grated"], ["shredded", "cut into thin strips", "julienned"]),
    "strip": ([], ["cut into strips", "sliced into strips", "cut into 2 inch pieces", "trimmed"]),
    "leaf": (["fresh", "torn", "chopped fresh"], ["torn into pieces", "roughly chopped", "stems removed"]),
    "chunk": ([], ["cut into chunks", "cut into bite-size pieces", "cut into pieces"]),
    "dot": (["minced", "finely chopped"], ["minced", "finely chopped"]),
    "crumble": (["crumbled"], ["crumbled", "cooked and crumbled"]),
    "powder": (["grated", "ground"], []),
    "whole": (["whole"], ["halved", "rinsed and drained", "whole"]),
    "bean": ([], ["rinsed and drained", "drained"]),
    "curl": ([], ["peeled and deveined", "cooked"]),
    "blob": ([], []),
    "egg": (["beaten"], ["beaten", "lightly beaten"]),
    "drizzle": ([], []),
    "square": (["toasted"], ["toasted", "cut in half"]),
    "none": ([], []),
}

SHAPES = sorted(PREP)  # every shape the renderer draws


@dataclass(frozen=True)
class Ingredient:
    """One catalogue ingredient and its visual signature."""

    idx: int
    name: str  # cleaned name (det_ingrs.json)
    titles: tuple[str, ...]  # words used in recipe titles
    group: str
    kind: str  # visible | base | batter | liquid | pantry
    colour: tuple[int, int, int]
    shapes: tuple[str, ...]
    size: str  # s | m | l
    unit: str
    adjectives: tuple[str, ...]


@dataclass(frozen=True)
class Dish:
    """One dish type: names for titles, vessel, layout, allowed methods and ingredient slots."""

    idx: int
    key: str
    names: tuple[str, ...]
    vessel: str
    layout: str
    methods: tuple[str, ...]
    slots: tuple[tuple[str, int, int], ...]
    weight: float


@dataclass(frozen=True)
class Catalog:
    ingredients: tuple[Ingredient, ...]
    dishes: tuple[Dish, ...]
    by_group: dict[str, tuple[int, ...]]  # group -> ingredient indices, most popular first


def _hex(s: str) -> tuple[int, int, int]:
    return int(s[0:2], 16), int(s[2:4], 16), int(s[4:6], 16)


@lru_cache(maxsize=1)
def catalog() -> Catalog:
    """Parse the tables once per process."""
    ings: list[Ingredient] = []
    for line in _INGREDIENTS.strip().splitlines():
        name, titles, group, kind, colour, shapes, size, unit, adjs = line.split("|")
        ings.append(Ingredient(len(ings), name, tuple(titles.split("/")), group, kind, _hex(colour),
                               tuple(shapes.split(",")), size, unit, tuple(a for a in adjs.split("/") if a)))
    dishes: list[Dish] = []
    for line in _DISHES.strip().splitlines():
        key, names, vessel, layout, methods, slots, weight = line.split("|")
        parsed = []
        for s in slots.split(","):
            g, rng = s.split(":")
            lo, hi = rng.split("-")
            parsed.append((g, int(lo), int(hi)))
        dishes.append(Dish(len(dishes), key, tuple(names.split("/")), vessel, layout, tuple(methods.split(",")),
                           tuple(parsed), float(weight)))
    by_group: dict[str, list[int]] = {}
    for ing in ings:
        by_group.setdefault(ing.group, []).append(ing.idx)
    return Catalog(tuple(ings), tuple(dishes), {g: tuple(v) for g, v in by_group.items()})
